"""scripts/gpu_bench.sh, the parts that run without a GPU: the pinned list, and wheels cut into
carry-sized parts, staged one call at a time, joined and installed into a site folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_bench.sh"


def _script(*args: str, **env: str) -> str:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "PATH": path, **env})
    return done.stdout


def _wheel(folder: Path, payload: bytes) -> None:
    """A minimal pure-Python wheel: a package holding `payload`."""
    folder.mkdir(parents=True)
    info = "probe_pkg-0.1.dist-info"
    with zipfile.ZipFile(folder / "probe_pkg-0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("probe_pkg/__init__.py", "from pathlib import Path\n"
                                                "PAYLOAD = (Path(__file__).parent / 'payload.bin').read_bytes()\n")
        wheel.writestr("probe_pkg/payload.bin", payload)
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: probe_pkg\nVersion: 0.1\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


def test_wheels_travel_in_parts_and_install_into_a_site_folder(tmp_path):
    payload = os.urandom(300 * 1024)  # incompressible: the parts really split it
    _wheel(tmp_path / "whl", payload)
    env = {"QSWEEP_WHEELS": str(tmp_path / "whl"), "QSWEEP_PARTS": str(tmp_path / "parts"),
           "QSWEEP_PART_SIZE": "100k", "QSWEEP_STAGE": str(tmp_path / "stage"), "QSWEEP_SITE": str(tmp_path / "site")}
    _script("pack", **env)
    parts = sorted((tmp_path / "parts").iterdir())
    assert len(parts) >= 3 and all(p.stat().st_size <= 100 * 1024 for p in parts)
    for part in parts:  # one device call each
        _script("stage", str(part), **env)
    _script("install", **env)
    check = subprocess.run([sys.executable, "-c", "import probe_pkg, sys; sys.stdout.buffer.write(probe_pkg.PAYLOAD)"],
                           capture_output=True, check=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert check.stdout == payload


def test_pins_leave_out_torch_and_what_the_gpu_machine_already_has(tmp_path):
    have = tmp_path / "have.txt"
    have.write_text("numpy==2.0.0\nPyYAML==6.0\n")
    names = {line.split("==")[0].lower() for line in _script("pins", str(have)).split()}
    assert {"ray", "bitsandbytes", "optuna", "mlflow", "lm-eval", "datasets", "peft", "transformers"} <= {
        n.replace("_", "-") for n in names}
    assert not names & {"torch", "numpy", "pyyaml"} and not any(n.startswith("nvidia") for n in names)
    without_ray = {line.split("==")[0].lower() for line in _script("pins", str(have), QSWEEP_NO_RAY="1").split()}
    assert "ray" not in without_ray and "bitsandbytes" in without_ray
