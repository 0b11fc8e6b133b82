"""Claiming a piece of work that concurrent processes would otherwise all do: the untuned base's
score, which every trial starting at the same moment would otherwise compute.

A claim is a file created exclusively (O_CREAT | O_EXCL: of processes racing for one name, exactly
one creates it) holding the claimant's pid, host and time, in a folder every trial of the sweep sees
(the sweep's output folder, which a cluster shares anyway). A file rather than a Ray actor: it needs
no process of its own, outlives a driver that dies (a resumed sweep sees what was scored), and works
the same on one machine and on a cluster with a shared output folder.

A claim whose process died on this host is stale and taken over; a claim from another host is
never judged (its pid means nothing here), so work a dead remote claimant left undone is done by
the driver at the end instead (orchestrate.stages.finish_baselines). Taking over creates the next
generation of the name (`KEY.claim`, `KEY.claim.1`, ...) exclusively too, so of two processes
finding the same stale claim only one takes it, and no file is ever deleted under another's feet.
Only the holder removes its own claim, to give the work back when it failed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

PID_REUSE_SLACK_S = 2.0


@dataclass(frozen=True)
class Claim:
    path: Path  # the file this process created: it holds the claim while the file exists

    def release(self) -> None:
        """Gives the work back (it failed): the next process to ask may claim it."""
        self.path.unlink(missing_ok=True)


def _generation(path: Path, n: int) -> Path:
    return path if n == 0 else path.with_name(f"{path.name}.{n}")


def _latest(path: Path) -> int:
    """The highest generation of the claim that exists, -1 when none does."""
    n = -1
    while _generation(path, n + 1).exists():
        n += 1
    return n


def holder(path: Path) -> dict | None:
    """Who holds the claim (pid, host, time), None when nobody does."""
    n = _latest(path)
    if n < 0:
        return None
    try:
        return json.loads(_generation(path, n).read_text())
    except (OSError, ValueError):
        return {}  # being written right now, or by a process that died mid-write: held


def _alive_here(claim: dict) -> bool:
    """Whether the claim's process still runs, judged only for this host's claims (else True)."""
    if claim.get("host") != socket.gethostname() or not isinstance(claim.get("pid"), int):
        return True
    try:
        os.kill(claim["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    # A pid reused by a later process: the claimant is gone even though the number lives on. The
    # slack covers a start time derived from the boot time in whole seconds; misjudging costs only
    # a second scoring of the same base.
    try:
        return psutil.Process(claim["pid"]).create_time() <= claim.get("time", float("inf")) + PID_REUSE_SLACK_S
    except psutil.Error:
        return False


def claim(path: Path) -> Claim | None:
    """Claims `path` for this process: a Claim when it is ours now (nobody held it, or its holder
    died on this host), None when another live (or unknown) process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        n = _latest(path)
        if n >= 0:
            current = holder(path)
            if current is None:
                continue  # released between the two looks: try again from the start
            if not current or _alive_here(current):
                return None
        target = _generation(path, n + 1)
        try:
            descriptor = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None  # another process claimed it (or took the stale claim over) first
        with os.fdopen(descriptor, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, handle)
        return Claim(target)
