"""The log of one Ray task: a trial, or a final-stage group scoring its finalists."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

TRIAL_LOGGERS = ("qsweep", "transformers", "peft", "lm_eval")


@contextlib.contextmanager
def trial_log(path: Path) -> Iterator[None]:
    """The task's own log: a trial's last lines go to MLflow when it fails. Closed when the task
    ends, so the next task Ray gives this worker process writes only to its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in TRIAL_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("qsweep").setLevel(logging.INFO)
    try:
        yield
    finally:
        for name in TRIAL_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
