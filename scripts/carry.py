"""What the GPU proof needs and the GPU machine lacks, carried there as one compressed site folder.

The device machine (Python 3.12, torch 2.11, transformers 5.17, accelerate 1.15, peft, numpy,
pandas, pyarrow, scipy, ...; no package index) gets these distributions, pinned to the versions of
this venv, the ones the tests ran on. Only what the proof's processes import is carried
(`CARRY`: found by tracing every import of the CPU dry run, its Ray workers included), and the
installed tree is stripped of what no qsweep path loads (`STRIP`): the 51 wheels total 190 MB
(Ray's alone is 79 MB, a call carries 64 MiB); the stripped tree compressed with xz is 54 MiB.

    python scripts/carry.py                      # here: .carry/site.tar.xz (+ manifest.json)
    python scripts/carry.py --python-version 3.11 --out /tmp/carry311   # a copy this machine can import
    python scripts/carry.py --install .carry/site.tar.xz --site /tmp/qsweep-site   # there (stdlib only)

The install unpacks and compiles once per carry (a stamp in the site folder), then lists every
requirement of a carried distribution that the machine's packages do not meet, so a version clash
is named, not guessed. scripts/gpu_proof.md says how the list and the stripping were checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# distribution -> why it travels (the GPU machine lacks it, or has a version the tests never ran on).
CARRY = {
    "ray": "runs the trials (Ray Tune)",
    "jsonschema": "Ray's runtime environments", "jsonschema-specifications": "jsonschema", "referencing": "jsonschema",
    "rpds-py": "jsonschema", "wcwidth": "Ray's tabulate", "tensorboardX": "Ray Tune's loggers",
    "protobuf": "Ray's and MLflow's generated code need a runtime at least as new as they were built with",
    "optuna": "suggests the trials", "alembic": "optuna's and MLflow's sqlite schema", "mako": "alembic",
    "colorlog": "optuna", "sqlalchemy": "optuna's and MLflow's storage",
    "mlflow": "tracking", "mlflow-skinny": "tracking", "mlflow-tracing": "tracking", "cachetools": "mlflow",
    "sqlparse": "mlflow's search filters", "opentelemetry-api": "mlflow", "opentelemetry-sdk": "mlflow",
    "opentelemetry-semantic-conventions": "mlflow", "opentelemetry-proto": "mlflow", "databricks-sdk": "mlflow",
    "fastapi": "mlflow imports it", "starlette": "fastapi", "importlib-metadata": "mlflow",
    "cryptography": "MLflow's model registry tables", "cffi": "cryptography",
    "lm-eval": "scores the adapters", "datasets": "training data and lm-eval", "dill": "datasets",
    "multiprocess": "datasets", "httpx2": "datasets", "httpcore2": "httpx2", "truststore": "httpcore2",
    "pytz": "imported by the trial workers",
    "bitsandbytes": "4-bit quantization (only its CUDA 13 and CPU libraries travel)",
    "transformers": "5.25 is tested here; the machine has 5.17",
    "huggingface-hub": "transformers 5.25 needs >= 2.4; the machine has 1.33",
    "kernels": "transformers 5.25 imports it", "regex": "transformers 5.25 needs >= 2025.10.22",
    "peft": "pinned to the version tested here", "accelerate": "1.16 is tested here; the machine has 1.15",
    "pydantic": "qsweep's configs", "pydantic-core": "pydantic", "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typer": "qsweep's CLI, pinned", "click": "typer and Ray, pinned", "rich": "qsweep's CLI, pinned",
    "plotly": "the sweep report",
}
# Paths (globs inside the site folder) no qsweep path loads on the GPU machine.
STRIP = [
    "ray/jars", "ray/dashboard/client", "ray/rllib", "ray/serve", "ray/llm", "ray/tests", "ray/*/tests",
    "bitsandbytes/libbitsandbytes_cuda1[0-2]*.so", "bitsandbytes/libbitsandbytes_rocm*.so",
    "bitsandbytes/libbitsandbytes_xpu*.so",
    "mlflow/server/js", "mlflow/java", "mlflow/R",
    "bin", "share", "*/__pycache__", "**/__pycache__",
]
# lm-eval's task folders: qsweep reads its own tasks and, of lm-eval's, only mmlu's YAMLs.
LM_EVAL_TASKS_KEPT = {"mmlu"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
STAMP = ".qsweep-carry"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> list[str]:
    """NAME==VERSION for every distribution in CARRY, at the version installed here."""
    return [f"{name}=={metadata.version(name)}" for name in CARRY]


def target_flags(python_version: str) -> list[str]:
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    return ["--only-binary=:all:", "--no-deps", "--python-version", python_version, "--implementation", "cp",
            *platforms]


def download(wheels: Path, python_version: str) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), *target_flags(python_version),
                    *pins()], check=True)


def install_tree(wheels: Path, site: Path, python_version: str) -> None:
    shutil.rmtree(site, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", str(site),
                    *target_flags(python_version), *sorted(str(w) for w in wheels.glob("*.whl"))], check=True)


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def strip(site: Path) -> None:
    for pattern in STRIP:
        for path in site.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    tasks = site / "lm_eval" / "tasks"
    for folder in (p for p in tasks.iterdir() if p.is_dir() and p.name not in LM_EVAL_TASKS_KEPT | {"__pycache__"}):
        shutil.rmtree(folder)
    strip_symbols(site)


def strip_symbols(site: Path) -> None:
    """Debug symbols out of every native library and program (Ray's three alone shrink by 30 MB);
    --strip-unneeded keeps what dynamic linking needs."""
    if shutil.which("strip") is None:
        return
    for path in site.rglob("*"):
        if path.is_file() and not path.is_symlink() and is_native(path):
            subprocess.run(["strip", "--strip-unneeded", str(path)], check=False, capture_output=True)


def is_native(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"\x7fELF"


def compress(site: Path, archive: Path) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_suffix(".partial")
    # xz, which the GPU machine's Python unpacks with the stdlib alone; the xz program compresses on
    # every core (tarfile's own lzma uses one and takes minutes), tarfile where there is none.
    if shutil.which("xz") and shutil.which("tar"):
        subprocess.run(["tar", "-C", str(site), "-I", "xz -T0 -6", "-cf", str(partial), "."], check=True)
    else:
        with tarfile.open(partial, "w:xz") as tar:
            for path in sorted(site.iterdir()):
                tar.add(path, arcname=path.name)
    partial.rename(archive)


def build(out: Path, python_version: str, work: Path) -> dict:
    wheels, site = work / f"wheels-{python_version}", work / f"site-{python_version}"
    download(wheels, python_version)
    install_tree(wheels, site, python_version)
    installed = tree_bytes(site)
    strip(site)
    archive = out / "site.tar.xz"
    compress(site, archive)
    manifest = {
        "python_version": python_version, "pins": pins(),
        "wheels_mb": round(tree_bytes(wheels) / 2**20, 1), "installed_mb": round(installed / 2**20, 1),
        "stripped_mb": round(tree_bytes(site) / 2**20, 1), "archive_mb": round(archive.stat().st_size / 2**20, 1),
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def unmet_requirements(site: Path) -> dict[str, list[str]]:
    """Each carried distribution's requirements that the site folder and this interpreter's own
    packages together do not meet: missing (often optional in practice) and wrong versions."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return {"unchecked": ["the packaging module is not installed here"]}
    path = [str(site), *sys.path]
    versions: dict[str, str] = {}
    for dist in metadata.distributions(path=path):  # the first one found wins, as for imports
        versions.setdefault(canonical(dist.metadata["Name"]), dist.version)
    unmet: dict[str, list[str]] = {"missing": [], "wrong_version": []}
    for dist in metadata.distributions(path=[str(site)]):
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            have = versions.get(canonical(requirement.name))
            owner = f"{dist.metadata['Name']} {dist.version} needs {requirement}"
            if have is None:
                unmet["missing"].append(owner)
            elif not requirement.specifier.contains(have, prereleases=True):
                unmet["wrong_version"].append(f"{owner}, has {have}")
    return unmet


def install(archive: Path, site: Path) -> None:
    started = time.perf_counter()
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    stamp = site / STAMP
    if stamp.exists() and stamp.read_text().strip() == digest:
        print(f"carry: {site} already holds {archive.name} ({digest[:12]})", flush=True)
    else:
        shutil.rmtree(site, ignore_errors=True)
        site.mkdir(parents=True)
        if shutil.which("xz") and shutil.which("tar"):  # xz unpacks the archive's blocks on every core
            subprocess.run(["tar", "-C", str(site), "-I", "xz -T0", "-xf", str(archive)], check=True)
        else:
            with tarfile.open(archive, "r:xz") as tar:
                tar.extractall(site, filter="fully_trusted")
        # The carry travels as source. Compiled once here on every core: otherwise, where
        # PYTHONDONTWRITEBYTECODE is set, each Ray process compiles Ray again, and a dashboard agent
        # that takes over 15 s to start makes the raylet abort ("metrics_agent_port" timeout).
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(site)], check=False,
                       capture_output=True)
        stamp.write_text(digest + "\n")
        print(f"carry: unpacked and compiled {archive.name} into {site} in {time.perf_counter() - started:.1f} s",
              flush=True)
    unmet = unmet_requirements(site)
    (site / "unmet_requirements.json").write_text(json.dumps(unmet, indent=2) + "\n")
    for line in unmet.get("wrong_version", []) + unmet.get("unchecked", []):
        print(f"carry: {line}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    parser.add_argument("--out", type=Path, default=REPO / ".carry")
    parser.add_argument("--work", type=Path, help="where wheels and the site folder are built (default: a temp folder)")
    parser.add_argument("--install", type=Path, metavar="ARCHIVE",
                        help="unpack ARCHIVE into --site (on the GPU machine)")
    parser.add_argument("--site", type=Path, default=Path("/tmp/qsweep-site"))
    args = parser.parse_args()
    if args.install:
        install(args.install, args.site)
        return
    if args.work:
        print(json.dumps(build(args.out, args.python_version, args.work), indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="qsweep-carry-") as work:
        print(json.dumps(build(args.out, args.python_version, Path(work)), indent=2))


if __name__ == "__main__":
    main()
