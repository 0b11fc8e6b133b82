"""The terminal while a sweep runs: one live table of its trials; the libraries' output to a log file.

`LiveView` is a Ray Tune callback that fills report.progress's state model from Ray's trial events
and draws it with the same table `qsweep status` prints. On a terminal it redraws in place
(rich.live); elsewhere (CI, `nohup`, a scheduler) it prints one plain line per event; called from
Python it only logs. `sweep_output` sends Ray's, MLflow's, Optuna's and transformers' own output to
the sweep's log file for the duration, unless the user asked for it with `--verbose`.
"""

from __future__ import annotations

import atexit
import logging
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from ray.tune import Callback
from rich.console import Console
from rich.live import Live

from qsweep.config.schema import SweepConfig
from qsweep.orchestrate.status import write_driver
from qsweep.report.progress import (
    FAILED,
    FINISHED,
    RETRYING,
    RUNNING,
    STOPPED,
    SWEEP_DONE,
    SweepProgress,
    TrialRow,
    best_line,
    counts_line,
    duration,
    event_line,
    progress_table,
)
from qsweep.resources.packing import Machine
from qsweep.search.objective import FAILED as FAILED_KEY
from qsweep.search.objective import OBJECTIVE
from qsweep.search.space import apply_params
from qsweep.tracking.ray_callback import classify_failure, error_summary, trial_error_text

logger = logging.getLogger(__name__)

REDRAW_EVERY_S = 1.0
# Lines the table's title and caption take: the rest of the terminal is for trial rows.
TABLE_CHROME_LINES = 9
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Output(str, Enum):
    LIVE = "live"  # a terminal: the table is redrawn in place
    LINES = "lines"  # not a terminal, or --verbose: one plain line per event
    LOG = "log"  # a library caller: events go to the logger only


# Ray unpickles the callback when a sweep resumes, so where its output goes is decided here, by the
# command, rather than carried by the callback; `_terminal` is the stdout the command started with.
_output = Output.LOG
_terminal: TextIO = sys.stdout


def failure_reason(text: str) -> str:
    """The same words the MLflow mirror writes as the run's `qsweep.reason`."""
    return f"{classify_failure(text)[1]}: {error_summary(text)}"


class LiveView(Callback):
    def __init__(self, sweep: SweepConfig, folder: Path, machine: Machine, train_rows: int = 0):
        """`train_rows`: the training set's size, for trials that train for epochs (orchestrate.steps)."""
        self.sweep = sweep
        self.folder = folder
        self.train_rows = train_rows
        search = sweep.search
        self.progress = SweepProgress(sweep.name, search.metric, search.direction, search.num_trials, time.time(),
                                      machine.device, machine.memory_mb)
        self._console: Console | None = None
        self._live: Live | None = None
        self._synced = False
        self._drawn = 0.0

    def __getstate__(self) -> dict:
        # Ray pickles callbacks with the tuner; a console bound to this terminal is not picklable.
        return {**self.__dict__, "_console": None, "_live": None, "_synced": False}

    def setup(self, **info: Any) -> None:
        write_driver(self.folder, self.progress.device, self.progress.device_memory_mb)
        if _output is Output.LOG:
            return
        self._console = Console(file=_terminal, highlight=False)
        if _output is Output.LIVE:
            # stdout is the log file by now (see sweep_output): nothing may be echoed above the table.
            self._live = Live(self._table(), console=self._console, auto_refresh=False, redirect_stdout=False,
                              redirect_stderr=False)
            self._live.start()
            # A crash past Ray's own handling must still give the terminal its cursor back.
            atexit.register(self._stop)

    def _table(self) -> Any:
        rows = self._console.size.height - TABLE_CHROME_LINES if self._console else None
        return progress_table(self.progress, max_rows=max(3, rows) if rows else None)

    def _redraw(self) -> None:
        if self._live is not None:
            self._live.update(self._table(), refresh=True)
            self._drawn = time.time()

    def _stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _emit(self, row: TrialRow, event: str) -> None:
        line = event_line(self.progress, row, event)
        if _output is Output.LIVE:
            self._redraw()
        elif _output is Output.LINES and self._console is not None:
            self._console.print(line, markup=False, soft_wrap=True)
        else:
            logger.info(line)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._synced:
            self._synced = True
            self._sync_restored(trials)

    def _sync_restored(self, trials: list) -> None:
        """A resumed sweep's trials that ended before the restart get no events: read them from Ray."""
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in self.progress.trials:
                row = self._row(trial)
                self._apply(row, trial.last_result or {})
                self._end(row, trial)
        self._redraw()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.time() - self._drawn >= REDRAW_EVERY_S:
            self._redraw()

    def _row(self, trial: Any) -> TrialRow:
        resolved = apply_params(self.sweep.trial(), trial.config)
        row = TrialRow(trial.trial_id, dict(trial.config), resolved.training.total_steps(self.train_rows))
        self.progress.trials[trial.trial_id] = row
        return row

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._emit(self._row(trial), "started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        row = self.progress.trials.get(trial.trial_id) or self._row(trial)
        self._apply(row, result)
        if FAILED_KEY not in result and OBJECTIVE not in result:
            self._emit(row, "progress")

    def _apply(self, row: TrialRow, result: dict) -> None:
        if FAILED_KEY in result:
            row.reason = failure_reason(result[FAILED_KEY])
            return
        if "eval_loss" in result:
            row.step, row.eval_loss = int(result.get("step", row.step)), result["eval_loss"]
        if OBJECTIVE in result:
            row.score = result.get("scores", {}).get(self.progress.metric, result[OBJECTIVE])
            row.peak_mb = result.get("measures", {}).get("peak_memory_mb")

    def _end(self, row: TrialRow, trial: Any) -> None:
        """The same reading of a trial's last result as the MLflow mirror's (finished, failed or stopped)."""
        last = trial.last_result or {}
        if trial.status == "ERROR":
            row.state, row.reason = FAILED, failure_reason(trial_error_text(trial))
        elif FAILED_KEY in last:
            row.state, row.reason = FAILED, failure_reason(last[FAILED_KEY])
        elif OBJECTIVE in last:
            row.state = FINISHED
        else:
            row.state = STOPPED

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self.progress.trials.get(trial.trial_id) or self._row(trial)
        self._end(row, trial)
        self._emit(row, row.state)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self.progress.trials.get(trial.trial_id) or self._row(trial)
        row.state, row.reason = FAILED, failure_reason(trial_error_text(trial))
        self._emit(row, row.state)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self.progress.trials.get(trial.trial_id)
        if row is not None:
            row.state, row.reason = RETRYING, error_summary(trial_error_text(trial))
            self._emit(row, row.state)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.progress.state = SWEEP_DONE
        self.progress.ended = time.time()
        for row in self.progress.trials.values():
            if row.state in (RUNNING, RETRYING):
                # Ray ended the experiment (all-failing stop, Ctrl-C) before this trial did.
                row.state = STOPPED
        self._redraw()
        self._stop()
        if self._console is not None and _output is Output.LINES:
            self._console.print(counts_line(self.progress), markup=False, soft_wrap=True)
            self._console.print(best_line(self.progress), markup=False, soft_wrap=True)
        if self._console is not None and self.sweep.evaluation.final is not None:
            self._console.print(f"trials done in {duration(self.progress.elapsed())}; re-scoring the best "
                                f"{self.sweep.evaluation.final.top_k} on the final stage", markup=False)


def _terminal_handlers(target: logging.Logger) -> list[logging.Handler]:
    return [h for h in target.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def route_logs_to_file(path: Path) -> tuple[logging.FileHandler, Callable[[], None]]:
    """Every logger's terminal output goes to `path` instead; returns the file's handler and the
    function that undoes it.

    Ray, MLflow and Optuna each give their top logger its own stderr handler on import (and stop it
    propagating), so removing those and letting everything reach the root's file handler catches
    them all, and Python warnings too.
    """
    import mlflow  # noqa: F401 -- imported so their handlers exist now and are routed below
    import optuna  # noqa: F401
    import ray  # noqa: F401

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = [
        (root, root.handlers[:], root.propagate, root.level)]
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    for target in list(logging.root.manager.loggerDict.values()):
        if isinstance(target, logging.Logger) and _terminal_handlers(target):
            saved.append((target, target.handlers[:], target.propagate, target.level))
            target.handlers = [h for h in target.handlers if h not in _terminal_handlers(target)]
            target.propagate = True
    logging.captureWarnings(True)

    def restore() -> None:
        logging.captureWarnings(False)
        for target, handlers, propagate, level in saved:
            target.handlers, target.propagate = handlers, propagate
            target.setLevel(level)
        handler.close()

    return handler, restore


@contextmanager
def sweep_output(log_path: Path, verbose: bool) -> Iterator[None]:
    """The terminal for one `qsweep run`: the live view (or event lines); everything else in `log_path`.

    Ray's console reporter print()s its experiment banner and TensorBoard hint even at verbose=0,
    so the process's stdout and stderr go to the log too and only the view keeps the terminal.
    """
    global _output, _terminal
    _terminal = sys.stdout
    if verbose:
        _output = Output.LINES
        try:
            yield
        finally:
            _output = Output.LOG
        return
    _output = Output.LIVE if _terminal.isatty() else Output.LINES
    handler, restore = route_logs_to_file(log_path)
    try:
        with redirect_stdout(handler.stream), redirect_stderr(handler.stream):
            yield
    finally:
        _output = Output.LOG
        restore()
