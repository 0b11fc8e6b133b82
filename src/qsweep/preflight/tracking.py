"""The MLflow tracking URI: a sqlite file that can be created, a folder, or a server that answers.

Never creates the database or touches the store: a refused sweep leaves no trace.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from qsweep.config.paths import resolve_path
from qsweep.config.schema import DEFAULT_TRACKING_URI
from qsweep.preflight.output import nearest_existing

# A tracking server that does not answer within this many seconds is reported, not waited for.
SERVER_TIMEOUT_S = 2.0
# MLflow's SQLAlchemy stores (a `+driver` suffix is allowed) and hosted schemes we cannot probe here.
DATABASE_SCHEMES = {"sqlite", "postgresql", "mysql", "mssql"}
HOSTED_SCHEMES = {"databricks", "databricks-uc", "uc"}
SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_sqlite(uri: str) -> list[str]:
    """The database file's folder must exist and be writable; never creates the file."""
    if uri in ("sqlite://", "sqlite:///:memory:"):
        return ["tracking.uri: an in-memory sqlite database loses every run when the sweep ends; "
                f"use {DEFAULT_TRACKING_URI}"]
    if not uri.startswith("sqlite:///"):
        return [f"tracking.uri: {uri!r} is not a sqlite file URI; write sqlite:///PATH (three slashes before a "
                f"relative path, four before an absolute one), e.g. {DEFAULT_TRACKING_URI}"]
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
                f"to the working directory); create it or use {DEFAULT_TRACKING_URI}"]
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
            f"(mlflow server --port ...) or use a local store such as {DEFAULT_TRACKING_URI}"]


def _check_file_store(uri: str) -> list[str]:
    path = resolve_path(urlparse(uri).path if uri.startswith("file:") else uri, Path.cwd())
    # MLflow 3 refuses its folder store unless MLFLOW_ALLOW_FILE_STORE is true (read as MLflow's own
    # boolean variables are); say so before the sweep starts, not after its set-up.
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
        return [f"tracking.uri: {uri!r} is a folder (MLflow's file store), which MLflow 3 no longer accepts; "
                f"use a database file in it, sqlite:///{path}/mlflow.db, or export MLFLOW_ALLOW_FILE_STORE=true "
                "to keep the folder"]
    if path.exists() and not path.is_dir():
        return [f"tracking.uri: {path} is a file, not a folder for MLflow's file store; use a folder or "
                f"{DEFAULT_TRACKING_URI}"]
    start = nearest_existing(path)
    if not start.is_dir() or not os.access(start, os.W_OK | os.X_OK):
        return [f"tracking.uri: {path} cannot be created ({start} is not a writable folder); choose another path"]
    return []


def check_tracking(uri: str) -> list[str]:
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
    return [f"tracking.uri: unknown scheme {scheme!r} in {uri!r}; use {DEFAULT_TRACKING_URI}, a folder, "
            "http(s)://HOST:PORT of a tracking server, or a database URI (postgresql://, mysql://)"]
