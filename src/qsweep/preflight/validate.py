"""Everything checkable before training: one list of problems, each naming the field and the fix.

Each `_check_*` function does one check and returns its problems (an empty list when all is well),
so `validate_sweep` can report every mistake at once instead of stopping at the first. Nothing here
trains, starts Ray, or writes tracking files: a sweep that fails validation leaves no trace.
"""

from __future__ import annotations

import csv
import json
import os
import string
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from pydantic import ValidationError

from qsweep.config.schema import SweepConfig, SweepFileError, TrialConfig, describe_validation_error
from qsweep.evaluate.harness import builtin_task_names, include_dirs, local_tasks, task_manager
from qsweep.preflight.mmlu import check_mmlu
from qsweep.search.space import ParamSpec, SearchSpace, apply_params, check_space, find_space_file, load_space
from qsweep.train.data import LOCAL_FORMATS, is_local, local_path, template_fields
from qsweep.train.models import EMBEDDED, is_local_or_embedded
from qsweep.train.targets import TargetModuleError, linear_module_names, resolve_target_modules

# A tracking server that does not answer within this many seconds is reported, not waited for.
SERVER_TIMEOUT_S = 2.0
# MLflow's SQLAlchemy stores (a `+driver` suffix is allowed) and hosted schemes we cannot probe here.
DATABASE_SCHEMES = {"sqlite", "postgresql", "mysql", "mssql"}
HOSTED_SCHEMES = {"databricks", "databricks-uc", "uc"}
SQLITE_MAGIC = b"SQLite format 3\x00"
TRUTHY = {"1", "on", "yes", "true"}


def _env_flag(*names: str) -> bool:
    return any(os.environ.get(name, "").strip().lower() in TRUTHY for name in names)


def _nearest_existing(path: Path) -> Path:
    """The path itself or its closest existing ancestor: where a later mkdir would start."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


# --- search space -------------------------------------------------------------------------------


def _load_space(sweep: SweepConfig) -> tuple[SearchSpace | None, str, list[str]]:
    """The search space, the file it came from, and its problems (each branch's extremes included)."""
    if not sweep.search.space:
        return None, "", []
    try:
        space_file = find_space_file(sweep.search.space, sweep.base_dir)
    except SweepFileError as exc:
        return None, "", [f"search.space: {p}; give a path relative to the sweep file or a shipped name (qlora)"
                          for p in exc.problems]
    try:
        space = load_space(space_file)
    except SweepFileError as exc:
        # A model-level error has no field of its own: drop the empty location pydantic leaves.
        return None, str(space_file), [f"search.space ({space_file}): {p.removeprefix(': ')}" for p in exc.problems]
    return space, str(space_file), [f"search.space ({space_file}): {p}" for p in check_space(space, sweep.trial())]


def _when_value_problem(parent: str, spec: ParamSpec, value: Any) -> str | None:
    """Why the param `parent` (searched by `spec`) can never equal `value`, or None when it can."""
    if spec.choices is not None:
        # The same `in` test ParamSpec.matches applies when the sweep runs.
        return None if value in spec.choices else f"{parent} never takes {value!r} (its choices are {spec.choices})"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"{parent} is a low/high range, so it never takes {value!r}"
    if not spec.low <= value <= spec.high:
        return f"{value!r} is outside the range of {parent} [{spec.low:g}, {spec.high:g}]"
    if not spec.integer:
        return f"{parent} is a continuous range that never hits {value!r} exactly; give {parent} choices instead"
    if (value - spec.low) % (spec.step or 1):
        return f"{parent} steps from {spec.low:g} by {spec.step or 1:g} and never takes {value!r}"
    return None


def _check_when_values(space: SearchSpace, source: str) -> list[str]:
    """A `when:` value the parent param never takes silently disables the conditional param."""
    problems = []
    for name, spec in space.params.items():
        for parent, wanted in spec.when.items():
            parent_spec = space.params.get(parent)
            if parent_spec is None:
                continue  # SearchSpace already rejects a `when:` naming an unknown param
            for value in wanted if isinstance(wanted, list) else [wanted]:
                if why := _when_value_problem(parent, parent_spec, value):
                    problems.append(f"search.space ({source}): params.{name}.when.{parent}: {why}, so {name} would "
                                    f"never be suggested; use a value {parent} can take")
    return problems


def _check_baselines(sweep: SweepConfig, space: SearchSpace | None) -> list[str]:
    problems = []
    names = set(space.params) if space else set()
    for index, point in enumerate(sweep.search.baselines):
        if unknown := set(point) - names:
            problems.append(f"search.baselines.{index}: {sorted(unknown)} not in the search space ({sorted(names)}); "
                            "a baseline may only set the space's params")
            continue
        try:
            apply_params(sweep.trial(), point)
        except ValidationError as exc:
            problems += [f"search.baselines.{index}: {p}" for p in describe_validation_error(exc)]
    return problems


# --- data ----------------------------------------------------------------------------------------


class _BadData(ValueError):
    """A data file that `datasets` would fail to read, with the place and the fix."""


Rows = Iterator[tuple[str, set[str]]]


def _jsonl_rows(path: Path) -> Rows:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue  # datasets skips blank lines too
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _BadData(f"line {number} is not valid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise _BadData(f"line {number} is not a JSON object; each line must be one {{\"column\": value}} row")
            yield f"line {number}", set(row)


def _json_rows(path: Path) -> Rows:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _BadData(f"line {exc.lineno} is not valid JSON ({exc.msg}); fix it, or write one row per line "
                       "in a .jsonl file") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        # A mapping of column -> values: every row has every column.
        for index in range(max((len(v) for v in data.values()), default=0)):
            yield f"row {index + 1}", set(data)
    elif isinstance(data, list):
        for index, row in enumerate(data, 1):
            if not isinstance(row, dict):
                raise _BadData(f"item {index} is not a JSON object; give a list of {{\"column\": value}} rows")
            yield f"row {index}", set(row)
    else:
        raise _BadData("must hold a list of {\"column\": value} rows or a mapping of column -> list of values")


def _csv_rows(path: Path) -> Rows:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            return
        columns = set(header)  # datasets keeps header names as written, spaces included
        for row in reader:
            if not row:
                continue  # blank lines are skipped when read
            if len(row) != len(header):
                raise _BadData(f"line {reader.line_num} has {len(row)} fields but the header has {len(header)}; "
                               "quote values that contain commas")
            yield f"line {reader.line_num}", columns


READERS: dict[str, Callable[[Path], Rows]] = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}


def _check_data_file(field: str, path: Path, needed: set[str]) -> list[str]:
    """Present, readable, parseable, not empty, and every row has the columns the templates use."""
    where = f"data.{field}"
    if not path.exists():
        return [f"{where}: file {path} does not exist; fix the path (relative to the sweep file)"]
    if path.is_dir() or path.suffix not in READERS:
        return [f"{where}: {path} is not a {', '.join(LOCAL_FORMATS)} file; point it at one"]
    rows = 0
    try:
        for place, columns in READERS[path.suffix](path):
            rows += 1
            if missing := needed - columns:
                return [f"{where}: {place} of {path} lacks column(s) {sorted(missing)} used by data.prompt/"
                        f"data.completion; its columns are {sorted(columns)}; add them or change the templates"]
    except _BadData as exc:
        return [f"{where}: {path}: {exc}"]
    except UnicodeDecodeError:
        return [f"{where}: {path} is not UTF-8 text; re-save it as UTF-8"]
    except OSError as exc:
        return [f"{where}: cannot read {path}: {exc.strerror}; check its permissions"]
    if rows == 0:
        return [f"{where}: {path} has no rows; add examples (a header alone is not enough) or fix the path"]
    return []


def _hub_dataset_cached(dataset_id: str) -> bool:
    """Offline, `datasets` can load a hub dataset only from its own cache or the hub cache."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / ("datasets--" + dataset_id.replace("/", "--"))
    prepared = Path(datasets_config.HF_DATASETS_CACHE) / dataset_id.replace("/", "___")
    return hub.exists() or prepared.exists()


def _check_hub_dataset(field: str, dataset_id: str) -> list[str]:
    if not _env_flag("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") or _hub_dataset_cached(dataset_id):
        return []
    return [f"data.{field}: {dataset_id!r} is not a local file (relative to the sweep file) and, offline "
            "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE), the hub dataset is not cached; fix the path, point it at a "
            "local .jsonl/.json/.csv file, or download the dataset once while online"]


def _check_template(field: str, template: str) -> list[str]:
    """Rows are rendered with template.format(**row): only named fields can be filled."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        return [f"data.{field}: {template!r} is not a valid format string ({exc}); write a column as {{name}} "
                "and a literal brace as {{ or }}"]
    if positional := [f"{{{name}}}" for name in fields if not name or name.split(".")[0].split("[")[0].isdigit()]:
        return [f"data.{field}: {', '.join(positional)} cannot be filled from a row (it is positional); name a "
                "column instead, e.g. {question}"]
    return []


def _check_data(trial: TrialConfig, base_dir: Path) -> list[str]:
    problems = _check_template("prompt", trial.data.prompt) + _check_template("completion", trial.data.completion)
    if problems:
        return problems  # the columns a broken template needs are unknown
    needed = template_fields(trial.data.prompt) | template_fields(trial.data.completion)
    for field in ("train", "validation"):
        source = getattr(trial.data, field)
        if source is None:
            continue
        if is_local(source, base_dir):
            problems += _check_data_file(field, local_path(source, base_dir), needed)
        else:
            problems += _check_hub_dataset(field, source)
    return problems


# --- ASHA ----------------------------------------------------------------------------------------


def _check_asha_validation(sweep: SweepConfig) -> list[str]:
    if not sweep.search.asha.enabled or sweep.data.validation is not None:
        return []
    return ["data.validation: required while search.asha.enabled is true, because ASHA stops trials on their "
            "validation loss; add a validation file or set search.asha.enabled: false"]


def _check_asha_grace(sweep: SweepConfig) -> list[str]:
    grace, steps = sweep.search.asha.grace_steps, sweep.training.max_steps
    if not sweep.search.asha.enabled or grace <= steps:
        return []
    return [f"search.asha.grace_steps: {grace} is above training.max_steps ({steps}), so ASHA could never stop "
            f"a trial; set it to at most {steps}, or raise training.max_steps"]


def _check_asha_eval_every(sweep: SweepConfig) -> list[str]:
    every, steps = sweep.training.eval_every, sweep.training.max_steps
    if not sweep.search.asha.enabled or every <= steps:
        return []
    return [f"training.eval_every: {every} is above training.max_steps ({steps}), so no validation loss reaches "
            f"ASHA before a trial ends; set it to at most {steps}"]


# --- evaluation ----------------------------------------------------------------------------------


def _local_tasks(sweep: SweepConfig) -> dict[str, Path]:
    dirs = include_dirs(sweep.evaluation.include_path, sweep.base_dir)
    return local_tasks([d for d in dirs if d.is_dir()])


def _check_tasks(trial: TrialConfig, base_dir: Path) -> list[str]:
    dirs = include_dirs(trial.evaluation.include_path, base_dir)
    problems = [f"evaluation.include_path: {d} is not a folder; fix the path (relative to the sweep file)"
                for d in dirs if not d.is_dir()]
    local = local_tasks([d for d in dirs if d.is_dir()])
    unknown = [t for t in trial.evaluation.tasks if t not in local]
    if unknown:
        # Building lm-eval's built-in index costs ~14 s: only when a task is not local.
        builtin = builtin_task_names()
        for task in unknown:
            if task not in builtin:
                problems.append(
                    f"evaluation.tasks: {task!r} is neither a local task ({', '.join(sorted(local)) or 'none'}) "
                    "nor an lm-eval task; check the name or add its YAML to evaluation.include_path"
                )
    return problems


def _builtin_children(entry: Any) -> list[str]:
    """A built-in group lists its tasks in its config; a tag's index entry holds its members."""
    if entry is None or entry.kind.name not in ("GROUP", "TAG"):
        return []
    if entry.kind.name == "TAG":
        return sorted(entry.tags)
    children = (entry.cfg or {}).get("task", [])
    children = children if isinstance(children, list) else [children]
    names = [c.get("task") if isinstance(c, dict) else c for c in children]
    return [n for n in names if isinstance(n, str)]


def _builtin_members(name: str, seen: set[str] | None = None) -> set[str]:
    """The task and every task a built-in group or tag expands to: lm-eval reports each of them."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    members = {name}
    for child in _builtin_children(task_manager(True).task_index.get(name)):
        members |= _builtin_members(child, seen)
    return members


def _ranked_metrics(sweep: SweepConfig) -> list[tuple[str, str]]:
    """(field, metric) of every score the objective is built from."""
    if sweep.search.weights:
        return [(f"search.weights.{m}", m) for m in sweep.search.weights]
    return [("search.metric", sweep.search.metric)]


def _check_metrics(sweep: SweepConfig) -> list[str]:
    problems = []
    for field, metric in _ranked_metrics(sweep):
        # The metric's name is only worth checking once its task is known to be evaluated.
        problems += _check_metric_task(sweep, field, metric) or _check_metric_name(sweep, field, metric)
    return problems


def _check_metric_task(sweep: SweepConfig, field: str, metric: str) -> list[str]:
    tasks = sweep.evaluation.tasks
    task, _, name = metric.partition("/")
    if not task or not name:
        return [f"{field}: {metric!r} is not TASK/METRIC; write it as lm-eval reports it, e.g. "
                f"{tasks[0]}/acc"]
    if task in tasks:
        return []
    local = _local_tasks(sweep)
    # Only a built-in group or tag can report a task not named in evaluation.tasks (mmlu -> mmlu_anatomy).
    builtin = [t for t in tasks if t not in local]
    if builtin and any(t in builtin_task_names() and task in _builtin_members(t) for t in builtin):
        return []
    return [f"{field}: task {task!r} is not evaluated (evaluation.tasks: {tasks}), so no trial would "
            f"get a score; use one of those tasks, e.g. {tasks[0]}/{name}, or add {task} to evaluation.tasks"]


def _check_metric_name(sweep: SweepConfig, field: str, metric: str) -> list[str]:
    """For a local task that lists its metrics, the metric part must be one of them."""
    import yaml

    task, _, name = metric.partition("/")
    local = _local_tasks(sweep)
    if task not in local or task not in sweep.evaluation.tasks:
        return []
    try:
        config = yaml.load(local[task].read_text(), Loader=yaml.BaseLoader)
    except (OSError, yaml.YAMLError):
        return []  # the task check reports an unreadable task; lm-eval would fail on it anyway
    metrics = config.get("metric_list") if isinstance(config, dict) else None
    if not isinstance(metrics, list) or "filter_list" in config:
        return []  # defaults or filtered names: too many spellings to check here
    known = [m["metric"] for m in metrics if isinstance(m, dict) and isinstance(m.get("metric"), str)]
    if not known or name in known or name in {f"{k}_stderr" for k in known}:
        return []
    return [f"{field}: task {task!r} reports {', '.join(known)}, not {name!r}; use e.g. {task}/{known[0]}"]


# --- model and target modules --------------------------------------------------------------------


def _hub_config(name: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    return Path(cached).parent if isinstance(cached, str) else None


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _model_folder(sweep: SweepConfig) -> tuple[Path | None, list[str]]:
    """The folder holding the model's config.json, if it can be had without downloading."""
    name, where = sweep.model.name, "model.name"
    if name in EMBEDDED:
        from qsweep.train.models import resolve_model

        try:
            return resolve_model(name).path, []
        except Exception as exc:  # noqa: BLE001 - building an embedded model can fail many ways; report, don't crash
            return None, [f"{where}: cannot build the embedded model {name!r} ({type(exc).__name__}: {exc}); "
                          "run once while online, or give a local model folder"]
    local = Path(name).expanduser()
    local = local if local.is_absolute() or not (sweep.base_dir / local).exists() else sweep.base_dir / local
    if local.exists():
        if not (local / "config.json").is_file():
            return None, [f"{where}: folder {local.resolve()} has no config.json; point it at a folder written by "
                          "save_pretrained"]
        return local, []
    if not _is_repo_id(name):
        return None, [f"{where}: {name!r} is not an embedded model ({', '.join(EMBEDDED)}), an existing folder "
                      "(relative to the sweep file), or a hub id; fix the path or the name"]
    cached = _hub_config(name, sweep.model.revision)
    if cached is None and _env_flag("HF_HUB_OFFLINE"):
        return None, [f"{where}: {name!r} cannot be found offline: it is not an embedded model "
                      f"({', '.join(EMBEDDED)}), not a folder next to the sweep file, and not in the Hugging Face "
                      "cache, and HF_HUB_OFFLINE=1 forbids downloading it; download it once while online "
                      f"(hf download {name}) or set model.name to a local folder holding the model "
                      "(relative to the sweep file)"]
    return cached, []  # None online and not cached: the download happens at run time


def _check_targets(sweep: SweepConfig, space: SearchSpace | None, folder: Path) -> list[str]:
    try:
        names = linear_module_names(folder, sweep.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any config the model classes reject is a model.name problem
        return [f"model.name: cannot read the model's config in {folder} ({type(exc).__name__}: {exc}); "
                "check the folder, or set model.trust_remote_code: true if it needs custom code"]
    candidates = [("lora.target_modules", sweep.lora.target_modules)]
    if space and "lora.target_modules" in space.params:
        candidates += [(f"search.space params.lora.target_modules = {v!r}", v)
                       for v in space.params["lora.target_modules"].edge_values() if isinstance(v, (str, list))]
    problems = []
    for where, spec in candidates:
        try:
            resolve_target_modules(spec, names)
        except TargetModuleError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def _check_model(sweep: SweepConfig, space: SearchSpace | None) -> list[str]:
    folder, problems = _model_folder(sweep)
    return problems if folder is None else _check_targets(sweep, space, folder)


# --- tracking and outputs ------------------------------------------------------------------------


def _check_sqlite(uri: str) -> list[str]:
    """The database file's folder must exist and be writable; never creates the file."""
    if uri in ("sqlite://", "sqlite:///:memory:"):
        return ["tracking.uri: an in-memory sqlite database loses every run when the sweep ends; "
                "use sqlite:///mlflow.db"]
    if not uri.startswith("sqlite:///"):
        return [f"tracking.uri: {uri!r} is not a sqlite file URI; write sqlite:///PATH (three slashes before a "
                "relative path, four before an absolute one), e.g. sqlite:///mlflow.db"]
    # SQLAlchemy neither expands ~ nor resolves against the sweep file: relative means the working directory.
    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    path = path if path.is_absolute() else Path.cwd() / path
    if path.is_dir():
        return [f"tracking.uri: {path} is a folder, not a database file; add a file name, "
                f"e.g. {uri.rstrip('/')}/mlflow.db"]
    if path.exists():
        return _check_existing_sqlite(path)
    folder = path.parent
    if not folder.is_dir():
        return [f"tracking.uri: folder {folder} for the sqlite file does not exist (relative paths are relative "
                "to the working directory); create it or use sqlite:///mlflow.db"]
    if not os.access(folder, os.W_OK | os.X_OK):
        return [f"tracking.uri: folder {folder} is not writable, so {path.name} cannot be created; "
                "choose a writable folder"]
    return []


def _check_existing_sqlite(path: Path) -> list[str]:
    if not os.access(path, os.R_OK | os.W_OK):
        return [f"tracking.uri: {path} is not readable and writable; fix its permissions or use another file"]
    with path.open("rb") as handle:
        head = handle.read(len(SQLITE_MAGIC))
    if head and head != SQLITE_MAGIC:
        return [f"tracking.uri: {path} exists but is not a sqlite database; point the URI at a new file"]
    return []


def _server_answers(url: str) -> str | None:
    """None if anything answers HTTP at url within the timeout, else why not."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(url, timeout=SERVER_TIMEOUT_S).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # an HTTP error status is still an answer
        except (urllib.error.URLError, OSError, ValueError) as exc:
            outcome.append(str(getattr(exc, "reason", exc)))

    # A daemon thread bounds name resolution too, which urlopen's timeout does not cover.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(SERVER_TIMEOUT_S + 0.5)
    return outcome[0] if outcome else f"no answer within {SERVER_TIMEOUT_S:g} s"


def _check_server(uri: str) -> list[str]:
    if not urlparse(uri).hostname:
        return [f"tracking.uri: {uri!r} names no host; write http(s)://HOST:PORT"]
    why = _server_answers(uri.rstrip("/") + "/health")
    if why is None:
        return []
    return [f"tracking.uri: the tracking server at {uri} does not answer ({why}); start it "
            "(mlflow server --port ...) or use a local store such as sqlite:///mlflow.db"]


def _check_file_store(uri: str) -> list[str]:
    path = Path(urlparse(uri).path if uri.startswith("file:") else uri).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    if path.exists() and not path.is_dir():
        return [f"tracking.uri: {path} is a file, not a folder for MLflow's file store; use a folder or "
                "sqlite:///mlflow.db"]
    start = _nearest_existing(path)
    if not start.is_dir() or not os.access(start, os.W_OK | os.X_OK):
        return [f"tracking.uri: {path} cannot be created ({start} is not a writable folder); choose another path"]
    return []


def _check_tracking(uri: str) -> list[str]:
    # A bare `databricks` (MLflow's name for the workspace of the active profile) has no `:`.
    scheme = "databricks" if uri == "databricks" else urlparse(uri).scheme.lower()
    if scheme == "sqlite":
        return _check_sqlite(uri)
    if scheme in ("http", "https"):
        return _check_server(uri)
    if scheme in ("", "file"):
        return _check_file_store(uri)
    if scheme.split("+")[0] in DATABASE_SCHEMES or scheme in HOSTED_SCHEMES:
        return []  # needs credentials and drivers; MLflow reports those itself
    return [f"tracking.uri: unknown scheme {scheme!r} in {uri!r}; use sqlite:///mlflow.db, a folder, "
            "http(s)://HOST:PORT of a tracking server, or a database URI (postgresql://, mysql://)"]


def _check_output_dir(output_dir: str) -> list[str]:
    """Adapters and Ray state go to OUTPUT_DIR/NAME under the working directory: it must be creatable."""
    path = Path(output_dir).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    if path.exists() and not path.is_dir():
        return [f"output_dir: {path} is a file; choose a folder name"]
    start = _nearest_existing(path)
    if not start.is_dir() or not os.access(start, os.W_OK | os.X_OK):
        return [f"output_dir: {path} cannot be created ({start} is not a writable folder); choose another folder"]
    return []


# --- all together --------------------------------------------------------------------------------


def _check_fits(sweep: SweepConfig, space: SearchSpace | None) -> list[str]:
    """The smallest trial the sweep can run must fit this machine's device; checked last, since it
    needs the model's config and a valid space."""
    from qsweep.resources.packing import DoesNotFit, check_fits, extreme_trials, this_machine, trial_estimate

    if not is_local_or_embedded(sweep.model.name, sweep.base_dir):
        return []
    from qsweep.train.models import resolve_model

    machine = this_machine()
    path = resolve_model(sweep.model.name, sweep.model.revision, sweep.base_dir).path
    smallest = extreme_trials(sweep, space)["smallest"]
    try:
        check_fits(trial_estimate(smallest, path, machine.device), machine)
    except DoesNotFit as exc:
        return [f"resources: {exc}"]
    return []


def validate_sweep(sweep: SweepConfig, source: str, space: SearchSpace | None = None) -> SearchSpace | None:
    """Raises SweepFileError with every problem found; returns the search space, loaded from
    search.space unless one is given (an ablation builds its own)."""
    if space is None:
        space, space_file, problems = _load_space(sweep)
    else:
        space_file, problems = "ablation", [f"ablation: {p}" for p in check_space(space, sweep.trial())]
    if space is not None:
        problems += _check_when_values(space, space_file)
    problems += _check_baselines(sweep, space)
    problems += _check_data(sweep.trial(), sweep.base_dir)
    problems += _check_asha_validation(sweep) + _check_asha_grace(sweep) + _check_asha_eval_every(sweep)
    problems += _check_tasks(sweep.trial(), sweep.base_dir)
    problems += check_mmlu(sweep)
    problems += _check_metrics(sweep)
    problems += _check_model(sweep, space)
    problems += _check_tracking(sweep.tracking.uri)
    problems += _check_output_dir(sweep.output_dir)
    if not problems:
        problems += _check_fits(sweep, space)
    if problems:
        raise SweepFileError(source, problems)
    return space
