"""The sweep at a glance: one state model and one table, shared by the live view and `qsweep status`.

The live view fills the model from Ray Tune's events while the sweep runs; `qsweep status` fills it
from MLflow and the output folder afterwards (or from another shell). Both render it with
`progress_table`, so the two screens always read the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table
from rich.text import Text

from qsweep.config.schema import RATIO_JOIN

RUNNING = "running"
FINISHED = "finished"
STOPPED = "stopped early"
FAILED = "failed"
# The driver died while the trial ran; `qsweep resume` retries its config.
INTERRUPTED = "interrupted"
# Its worker or node was lost; Ray starts it again.
RETRYING = "retrying"
QUEUED = "queued"
DONE = (FINISHED, STOPPED, FAILED)
STATES = (RUNNING, RETRYING, INTERRUPTED, FINISHED, STOPPED, FAILED)
STYLES = {RUNNING: "bold cyan", RETRYING: "yellow", INTERRUPTED: "yellow", FINISHED: "green", STOPPED: "dim",
          FAILED: "bold red"}

# What the sweep as a whole is doing.
SWEEP_RUNNING = "running"
SWEEP_DONE = "trials ended"
SWEEP_FINISHED = "finished"
SWEEP_FAILED = "failed"
SWEEP_INTERRUPTED = "interrupted: driver not running"


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    max_steps: int
    state: str = RUNNING
    step: int = 0
    eval_loss: float | None = None
    score: float | None = None
    peak_mb: float | None = None
    reason: str = ""


@dataclass
class SweepProgress:
    name: str
    metric: str
    direction: str
    num_trials: int
    started: float
    device: str = ""
    device_memory_mb: float | None = None
    state: str = SWEEP_RUNNING
    ended: float | None = None
    trials: dict[str, TrialRow] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        counts = {state: 0 for state in STATES}
        for row in self.trials.values():
            counts[row.state] += 1
        counts[QUEUED] = self.queued()
        return counts

    def queued(self) -> int:
        """Trials Optuna has yet to suggest; none once the sweep is over (or gave up)."""
        if self.state != SWEEP_RUNNING:
            return 0
        return max(0, self.num_trials - len(self.trials))

    def best(self) -> TrialRow | None:
        scored = [r for r in self.trials.values() if r.state == FINISHED and r.score is not None]
        if not scored:
            return None
        pick = max if self.direction == "maximize" else min
        return pick(scored, key=lambda r: r.score)

    def elapsed(self, now: float | None = None) -> float:
        return (self.ended or now or time.time()) - self.started

    def done_fraction(self) -> float:
        """Trials that ended count whole, running ones by their step; queued ones not at all."""
        if not self.num_trials:
            return 1.0
        done = sum(1.0 if r.state in DONE else min(1.0, r.step / max(1, r.max_steps)) for r in self.trials.values())
        return min(1.0, done / self.num_trials)

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, assuming the rest goes at the pace so far; None when nothing can be said."""
        fraction = self.done_fraction()
        if self.state != SWEEP_RUNNING or fraction <= 0:
            return None
        return self.elapsed(now) * (1 - fraction) / fraction

    def share(self, row: TrialRow) -> float | None:
        if row.peak_mb is None or not self.device_memory_mb:
            return None
        return row.peak_mb / self.device_memory_mb


def duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def short_params(params: dict[str, Any]) -> str:
    """`lora.r=16` -> `r=16`: the field's own name is what a reader scans for (a tied param's
    ratio, `lora.alpha-per-lora.r`, shows as `alpha/r`)."""
    parts = []
    for key, value in params.items():
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{'/'.join(name.rsplit('.', 1)[-1] for name in key.split(RATIO_JOIN))}={shown}")
    return " ".join(parts)


def memory(progress: SweepProgress, row: TrialRow) -> str:
    if row.peak_mb is None:
        return "-"
    share = progress.share(row)
    return f"{row.peak_mb:,.0f} MiB" + (f" ({share:.1%})" if share is not None else "")


def counts_line(progress: SweepProgress, now: float | None = None) -> str:
    counts = progress.counts()
    parts = [f"{counts[state]} {state}" for state in (RUNNING, QUEUED, FINISHED, STOPPED, FAILED)]
    parts += [f"{counts[state]} {state}" for state in (RETRYING, INTERRUPTED) if counts[state]]
    eta = progress.eta(now)
    timing = f"elapsed {duration(progress.elapsed(now))}" + (f", ETA ~{duration(eta)}" if eta is not None else "")
    return f"{', '.join(parts)} · {timing}"


def best_line(progress: SweepProgress) -> str:
    best = progress.best()
    if best is None:
        return "best so far: none finished yet"
    return f"best so far: {best.trial_id} {progress.metric} = {number(best.score)} · {short_params(best.params)}"


def progress_table(progress: SweepProgress, now: float | None = None, max_rows: int | None = None) -> Table:
    """The one renderer: every started trial's row, the counts, the best trial, elapsed time and ETA."""
    rows = list(progress.trials.values())
    hidden = 0
    if max_rows is not None and len(rows) > max_rows:
        # On a small terminal, running trials stay and the oldest ended ones make room.
        running = [r for r in rows if r.state not in DONE]
        ended = [r for r in rows if r.state in DONE]
        keep = max(0, max_rows - len(running))
        hidden = len(ended) - keep
        shown = {id(r) for r in running + ended[len(ended) - keep:]}
        rows = [r for r in rows if id(r) in shown]
    finished_of = sum(1 for r in progress.trials.values() if r.state in DONE)
    table = Table(
        title=f"{progress.name} ({progress.state}): {finished_of}/{progress.num_trials} trials done",
        caption=counts_line(progress, now) + "\n" + best_line(progress)
        + (f"\n… {hidden} earlier trials not shown (qsweep status shows all)" if hidden else ""),
        caption_justify="left", title_justify="left",
        # The caption wraps at the table's width: a full-width table keeps each caption line whole.
        expand=True,
    )
    for column, justify in (("trial", "left"), ("state", "left"), ("step", "right"), ("val loss", "right"),
                            (progress.metric, "right"), ("peak memory", "right"), ("params", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    best = progress.best()
    for row in rows:
        trial = Text(row.trial_id, style="bold green" if row is best else "")
        state = Text(row.state + (f" ({row.reason})" if row.reason and row.state == FAILED else ""),
                     style=STYLES.get(row.state, ""))
        table.add_row(trial, state, f"{row.step}/{row.max_steps}", number(row.eval_loss), number(row.score),
                      memory(progress, row), short_params(row.params))
    return table


def event_line(progress: SweepProgress, row: TrialRow, event: str, now: float | None = None) -> str:
    """One plain line per event, for a log file, CI or `nohup`: no cursor tricks."""
    head = f"[{duration(progress.elapsed(now))}] trial {row.trial_id}"
    if event == "started":
        return f"{head} started: {short_params(row.params)}"
    if event == "progress":
        return f"{head} step {row.step}/{row.max_steps}, val loss {number(row.eval_loss)}"
    if row.state == FINISHED:
        detail = (f"{progress.metric} = {number(row.score)}, peak {memory(progress, row)}; "
                  f"{best_line(progress)}")
    elif row.state == STOPPED:
        detail = f"at step {row.step}/{row.max_steps}, val loss {number(row.eval_loss)}"
    else:
        detail = row.reason
    return f"{head} {row.state}: {detail} | {counts_line(progress, now)}"


def as_dict(progress: SweepProgress, now: float | None = None) -> dict[str, Any]:
    """The same view as data (`qsweep status --format json`)."""
    best = progress.best()
    return {
        "name": progress.name, "state": progress.state, "metric": progress.metric,
        "num_trials": progress.num_trials, "counts": progress.counts(),
        "elapsed_s": round(progress.elapsed(now), 1), "eta_s": progress.eta(now),
        "best": best.trial_id if best else None,
        "device": progress.device, "device_memory_mb": progress.device_memory_mb,
        "trials": [{**vars(row), "memory_share": progress.share(row)} for row in progress.trials.values()],
    }
