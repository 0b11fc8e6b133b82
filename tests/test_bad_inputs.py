"""Broken sweep files: each is refused with exit code 2 and a message naming the field; none trains.

Every file in tests/bad_sweeps holds one mistake (two hold several) and says on its first line
which field(s) the answer must name: `# expect: lora.r` (fragments separated by ` | `). Most run
in-process through CliRunner so lm-eval's built-in task index (~14 s) is built once; a few run
through the installed `qsweep` console script to check the real exit code and stderr.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qsweep.cli import app

BAD_DIR = Path(__file__).resolve().parent / "bad_sweeps"
BAD_FILES = sorted(BAD_DIR.glob("*.yaml"))
CONTROL = BAD_DIR / "control" / "good.yaml"
QUICKSTART = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"
# One per stage: YAML parsing, the pydantic schema, and the checks of validate_sweep.
SUBPROCESS_FILES = ["yaml_syntax.yaml", "lora_r_zero.yaml", "tracking_folder_missing.yaml"]
MULTI_FILES = ["multi_schema.yaml", "multi_checks.yaml"]


def expected(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: the first line must be `# expect: FIELD`"
    return [fragment.strip() for fragment in first.removeprefix("# expect: ").split(" | ")]


def flat(text: str) -> str:
    """Rich wraps long problems to the terminal width; compare with the wrapping undone."""
    return " ".join(text.split())


def problem_count(output: str) -> int:
    match = re.search(r"(\d+) problem\(s\)", output)
    assert match, output
    return int(match.group(1))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: anything a run would start (runs/, mlflow.db) lands here."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return folder


def assert_refused(path: Path, exit_code: int, output: str) -> None:
    text = flat(output)
    assert exit_code == 2, output
    assert "Traceback" not in output
    assert f"{path}:" in text, "the answer names the file"
    for fragment in expected(path):
        assert fragment in text, f"{path.name}: {fragment!r} not in:\n{output}"


def assert_nothing_started(workdir: Path) -> None:
    assert sorted(p.name for p in workdir.iterdir()) == [], "no runs/, mlflow.db or mlruns/ may appear"
    assert not (BAD_DIR / "runs").exists() and not (BAD_DIR / "mlflow.db").exists()
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), "Ray must not start"


def test_the_suite_has_enough_broken_files():
    assert len(BAD_FILES) >= 24
    for path in BAD_FILES:
        assert expected(path)


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_sweep_is_refused(path: Path, command: str, workdir: Path):
    result = CliRunner().invoke(app, [command, str(path)])
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}\n{result.output}"
    assert_refused(path, result.exit_code, result.output)
    assert_nothing_started(workdir)


@pytest.mark.parametrize("name", SUBPROCESS_FILES)
def test_console_script_refuses_bad_sweep(name: str, workdir: Path, tmp_path: Path):
    path = BAD_DIR / name
    bin_dir = Path(sys.executable).parent
    ray_tmp = tmp_path / "ray"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_TMPDIR": str(ray_tmp)}
    script = shutil.which("qsweep", path=env["PATH"])
    assert script, "the qsweep console script is not installed in this environment"
    for command in ("validate", "run"):
        done = subprocess.run([script, command, str(path)], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=300)
        assert_refused(path, done.returncode, done.stderr)
        assert "Traceback" not in done.stdout
    assert not ray_tmp.exists(), "Ray must not start"
    assert_nothing_started(workdir)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_missing_sweep_file_is_refused(command: str, workdir: Path):
    path = workdir.parent / "no_such_sweep.yaml"
    result = CliRunner().invoke(app, [command, str(path)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "cannot read the file" in flat(result.output) and "Traceback" not in result.output
    assert_nothing_started(workdir)


@pytest.mark.parametrize("name", MULTI_FILES)
def test_every_mistake_is_reported_at_once(name: str, workdir: Path):
    path = BAD_DIR / name
    fragments = expected(path)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert_refused(path, result.exit_code, result.output)
    assert problem_count(result.output) == len(fragments) > 1


# --- the good ones still pass --------------------------------------------------------------------


def write_sweep(folder: Path, data: dict) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_tiny_sweep_validates_and_writes_nothing(tiny_sweep_dict: dict, workdir: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["validate", str(write_sweep(tmp_path, tiny_sweep_dict))])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
    assert_nothing_started(workdir)


def test_control_sweep_validates(workdir: Path):
    """Every bad file is this one with one mistake: the mistake is what gets it refused."""
    result = CliRunner().invoke(app, ["validate", str(CONTROL)])
    assert result.exit_code == 0, result.output
    assert_nothing_started(workdir)


@pytest.mark.slow  # builds the embedded SmolLM2-135M once if it is not cached yet
def test_shipped_quickstart_validates(workdir: Path):
    result = CliRunner().invoke(app, ["validate", str(QUICKSTART)])
    assert result.exit_code == 0, result.output
    assert_nothing_started(workdir)


# --- the tracking server check answers quickly ---------------------------------------------------


class _Answering(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_answering_tracking_server_passes(tiny_sweep_dict: dict, workdir: Path, tmp_path: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tiny_sweep_dict["tracking"] = {"uri": f"http://127.0.0.1:{server.server_address[1]}"}
        result = CliRunner().invoke(app, ["validate", str(write_sweep(tmp_path, tiny_sweep_dict))])
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 0, result.output


# A probe without its own time limit would hang here: pytest-timeout fails it instead.
@pytest.mark.timeout(120)
def test_silent_tracking_server_is_reported_within_seconds(tiny_sweep_dict: dict, workdir: Path, tmp_path: Path):
    # Accepts connections (the kernel completes them) but never answers a request.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        tiny_sweep_dict["tracking"] = {"uri": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        path = write_sweep(tmp_path, tiny_sweep_dict)
        result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    # The probe gave up by its own time limit: the server accepted the connection and said nothing.
    assert re.search(r"tracking\.uri: the tracking server at \S+ does not answer "
                     r"\((timed out|no answer within [\d.]+ s)\)", flat(result.output)), result.output
