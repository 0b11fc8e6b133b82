"""scripts/carry.py, the parts that run on the GPU machine: a carried site folder is unpacked once
per carry, its packages import from there, and every requirement the machine does not meet is named."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "carry.py"


def _carry_module():
    spec = importlib.util.spec_from_file_location("carry", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _site(folder: Path, payload: bytes) -> Path:
    """An installed distribution as pip --target leaves it: a package and its dist-info."""
    (folder / "probe_pkg").mkdir(parents=True)
    (folder / "probe_pkg" / "__init__.py").write_text(
        "from pathlib import Path\nPAYLOAD = (Path(__file__).parent / 'payload.bin').read_bytes()\n")
    (folder / "probe_pkg" / "payload.bin").write_bytes(payload)
    info = folder / "probe_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: probe_pkg\nVersion: 0.1\n"
                                   "Requires-Dist: packaging>=1\nRequires-Dist: packaging<1\n"
                                   "Requires-Dist: no-such-dist-anywhere\n"
                                   "Requires-Dist: also-absent; extra == 'docs'\n")
    return folder


def _install(archive: Path, site: Path) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), "--install", str(archive), "--site", str(site)],
                          capture_output=True, text=True, check=True)
    return done.stdout


def test_a_carry_unpacks_once_imports_and_names_what_the_machine_lacks(tmp_path):
    carry = _carry_module()
    payload = os.urandom(200 * 1024)
    archive = tmp_path / "carry" / "site.tar.xz"
    carry.compress(_site(tmp_path / "built", payload), archive)
    site = tmp_path / "site"

    assert "unpacked and compiled" in _install(archive, site)
    assert list((site / "probe_pkg" / "__pycache__").glob("__init__.*.pyc"))  # compiled once, there
    read = "import probe_pkg, sys; sys.stdout.buffer.write(probe_pkg.PAYLOAD)"
    imported = subprocess.run([sys.executable, "-c", read], capture_output=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(site)})
    assert imported.stdout == payload
    unmet = json.loads((site / "unmet_requirements.json").read_text())
    assert unmet["missing"] == ["probe_pkg 0.1 needs no-such-dist-anywhere"]
    assert len(unmet["wrong_version"]) == 1 and unmet["wrong_version"][0].startswith("probe_pkg 0.1 needs packaging<1")

    (site / "probe_pkg" / "payload.bin").write_bytes(b"changed on the machine")
    assert "already holds" in _install(archive, site)  # the machine stayed warm: not unpacked again
    assert (site / "probe_pkg" / "payload.bin").read_bytes() == b"changed on the machine"


def test_every_carried_distribution_is_installed_here_to_be_pinned():
    """The pins are this venv's versions: a name in CARRY that is not installed here has no version."""
    carry = _carry_module()
    assert len(carry.pins()) == len(carry.CARRY)
    assert all(pin.count("==") == 1 for pin in carry.pins())


def test_strip_keeps_rays_binaries_and_lm_evals_mmlu(tmp_path):
    carry = _carry_module()
    site = tmp_path / "site"
    kept = ["ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server", "ray/dashboard/head.py",
            "ray/_raylet.so", "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cpu.so",
            "lm_eval/tasks/__init__.py", "lm_eval/tasks/mmlu/default/mmlu_anatomy.yaml", "mlflow/server/__init__.py"]
    gone = ["ray/jars/ray_dist.jar", "ray/dashboard/client/build/index.html", "ray/rllib/__init__.py",
            "bitsandbytes/libbitsandbytes_cuda128.so", "bitsandbytes/libbitsandbytes_rocm64.so",
            "lm_eval/tasks/arc/arc_easy.yaml", "mlflow/server/js/build/index.html", "ray/tune/tests/test_x.py"]
    for name in kept + gone:
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text("x")
    carry.strip(site)
    assert [name for name in kept if not (site / name).exists()] == []
    assert [name for name in gone if (site / name).exists()] == []
