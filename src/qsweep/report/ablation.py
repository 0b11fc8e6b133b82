"""Ablation statistics: what the driver computes after an ablation's runs are logged.

An ablation is a grid of cells (factor -> value), several seeds per cell. Each cell gets a mean over its
seeds with a Student-t 95% CI (seeds are the replicates that vary), and each non-reference value of
a factor is compared with the factor's reference value on the *same items* of the lm-eval task:
a paired bootstrap over items and an exact McNemar test. Pairing on items removes the item-to-item
difficulty variance, which with small eval sets dwarfs the effect being measured.

Everything reads what the driver already logged (MLflow child runs, per-item samples), so a
report can be recomputed from the tracking store alone. The tests come from scipy.stats; the
markdown and plot of a report are in qsweep.report.ablation_report.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from qsweep.config.schema import SEED_PARAM

logger = logging.getLogger(__name__)

SAMPLES_ARTIFACT = "lm_eval_samples.jsonl"
CONFIDENCE = 0.95
# Bootstrap replicates resampled per batch: bounds memory at n_items x batch indices.
BOOT_BLOCK = 1000
# Float noise in resampled means must not turn "as extreme as observed" into "less extreme".
P_EPS = 1e-12


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class CellRun:
    """One finished child run: its cell, its seed, its logged score and its per-item outcomes."""

    run_id: str
    cell: dict[str, str]
    seed: int
    score: float
    items: dict[int, float]


@dataclass(frozen=True)
class CellSummary:
    cell: dict[str, str]
    n_seeds: int
    mean: float
    ci_low: float
    ci_high: float
    scores: list[float]
    seeds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Comparison:
    """`value` minus `reference` for one factor, other factors at their reference values."""

    factor: str
    value: str
    reference: str
    diff: float
    ci_low: float
    ci_high: float
    p_bootstrap: float
    p_mcnemar: float | None
    n_items: int
    # McNemar's discordant counts (value right & reference wrong, value wrong & reference right)
    # and the seed whose runs they came from; None when the items are not 0/1.
    mcnemar_counts: tuple[int, int] | None = None
    mcnemar_seeds: tuple[int, int] | None = None


@dataclass(frozen=True)
class AblationReport:
    metric: str
    factors: dict[str, list[str]]
    reference: dict[str, str]
    cells: list[CellSummary]
    comparisons: list[Comparison]
    n_boot: int = 10000
    seed: int = 0
    notes: list[str] = field(default_factory=list)


def report_to_dict(report: AblationReport) -> dict[str, Any]:
    return dataclasses.asdict(report)


# --------------------------------------------------------------------------- reading runs


def split_metric(metric: str) -> tuple[str, str]:
    """`zorble/acc` -> (`zorble`, `acc`): the task's items and the per-item key to read."""
    task, sep, name = metric.rpartition("/")
    if not sep or not task or not name:
        raise ValueError(f"metric {metric!r} must be TASK/NAME, e.g. zorble/acc")
    return task, name


def logged_value(value: Any) -> str:
    """A config value as tracking.flatten + log_batch write it as an MLflow param."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def read_items(lines: Iterable[str], metric: str) -> dict[int, float]:
    """Per-item values of `metric` from lm_eval_samples.jsonl lines (one JSON record per item)."""
    task, name = split_metric(metric)
    items: dict[int, float] = {}
    keys_seen: set[str] = set()
    tasks_seen: set[str] = set()
    for line in lines:
        if not line.strip():
            continue
        record = json.loads(line)
        tasks_seen.add(str(record.get("task")))
        if record.get("task") != task:
            continue
        keys_seen.update(record)
        if name not in record:
            continue
        doc_id = int(record["doc_id"])
        # Two records for one item means several filters were scored; which one the metric means
        # is not recorded per item, so refuse rather than silently pick one.
        if doc_id in items:
            raise ValueError(f"task {task!r} has several records for doc_id {doc_id}; per-item {name!r} is ambiguous")
        items[doc_id] = float(record[name])
    if task not in tasks_seen:
        # Group tasks (mmlu) log their items under each subtask: a group metric has no items of its own.
        raise ValueError(f"no items of task {task!r} in {SAMPLES_ARTIFACT}; its tasks: {sorted(tasks_seen)}")
    if not items:
        known = sorted(keys_seen - {"task", "doc_id", "target", "loglikelihoods"})
        raise ValueError(f"no per-item {name!r} for task {task!r} in {SAMPLES_ARTIFACT}; per-item keys there: {known}")
    return items


def _child_runs(mlflow_client: Any, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Finished trial runs of the parent, every page of them."""
    query = (f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`qsweep.kind` = 'trial' "
             f"and tags.`qsweep.outcome` = 'finished'")
    runs: list[Any] = []
    token = None
    while True:
        page = mlflow_client.search_runs([experiment_id], filter_string=query, max_results=1000,
                                         order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def collect_cell_runs(mlflow_client: Any, experiment_id: str, parent_run_id: str, factors: Iterable[str],
                      metric: str, seed_param: str = SEED_PARAM) -> list[CellRun]:
    """Every finished child run of the parent as a CellRun, with its per-item outcomes on the task.

    `factors` are flattened param names as logged (`lora.r`); a dict of factor -> values works too.
    """
    factor_names = list(factors)
    cell_runs = []
    for run in _child_runs(mlflow_client, experiment_id, parent_run_id):
        params = run.data.params
        missing = [f for f in [*factor_names, seed_param] if f not in params]
        if missing:
            raise ValueError(f"run {run.info.run_id} has no param(s) {missing}; factors must be logged param names")
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow_client.download_artifacts(run.info.run_id, SAMPLES_ARTIFACT, tmp)
            items = read_items(Path(path).read_text().splitlines(), metric)
        item_mean = float(np.mean(list(items.values())))
        # The logged aggregate is the score of record; the item mean stands in only if it is absent.
        score = float(run.data.metrics.get(metric, item_mean))
        if not math.isclose(score, item_mean, rel_tol=1e-6, abs_tol=1e-9):
            logger.warning("run %s: logged %s = %s but its items average %s", run.info.run_id, metric, score,
                           item_mean)
        cell_runs.append(CellRun(run.info.run_id, {f: params[f] for f in factor_names}, int(float(params[seed_param])),
                                 score, items))
    return cell_runs


# --------------------------------------------------------------------------- statistics

def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| < t) = confidence for Student's t with df degrees of freedom."""
    return float(stats.t.ppf((1 + confidence) / 2, df))


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval over seeds; one seed has no spread, so low = high = mean."""
    data = np.asarray(values, dtype=float)
    mean = float(data.mean())
    if len(data) < 2:
        return mean, mean, mean
    half = t_quantile(confidence, len(data) - 1) * float(data.std(ddof=1)) / math.sqrt(len(data))
    return mean, mean - half, mean + half


def paired_bootstrap(diffs: np.ndarray, n_boot: int, seed: int,
                     confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean diff, CI low, CI high, two-sided p) from resampling items with replacement.

    The CI is scipy's percentile interval of the resampled means. scipy gives no p-value, so the
    bootstrap distribution it returns is shifted to mean 0 (the null of no difference) and the
    replicates at least as far from 0 as the observed mean are counted, with +1 in numerator and
    denominator so p is never reported as exactly 0.
    """
    diffs = np.asarray(diffs, dtype=float)
    observed = float(diffs.mean())
    with warnings.catch_warnings():
        # Identical items give a one-point distribution: a valid [0, 0] interval, not a problem.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap((diffs,), np.mean, n_resamples=n_boot, batch=BOOT_BLOCK, method="percentile",
                                 confidence_level=confidence, vectorized=True, rng=np.random.default_rng(seed))
    means = result.bootstrap_distribution
    extreme = int(np.count_nonzero(np.abs(means - observed) >= abs(observed) - P_EPS))
    interval = result.confidence_interval
    return observed, float(interval.low), float(interval.high), (extreme + 1) / (n_boot + 1)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar: discordant pairs ~ Binomial(b + c, 1/2) under the null."""
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(min(b, c), b + c, 0.5).pvalue)


def _is_binary(values: Iterable[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


# --------------------------------------------------------------------------- summarize


def _same_value(logged: str, listed: str) -> bool:
    """`1.0` logged for a listed `1`, `0.0002` for `2e-4`: numeric params compare as numbers."""
    if logged == listed:
        return True
    try:
        return float(logged) == float(listed)
    except ValueError:
        return False


def _canonical_cells(runs: list[CellRun], factors: dict[str, list[str]], notes: list[str]) -> list[CellRun]:
    """Runs with their cell values spelled as listed, so `1.0` and `1` land in one cell."""
    out = []
    for run in runs:
        cell = {}
        for name, values in factors.items():
            logged = run.cell[name]
            match = next((v for v in values if _same_value(logged, v)), None)
            if match is None:
                notes.append(f"run {run.run_id} has {name}={logged}, which is not a listed value")
                values.append(logged)
                match = logged
            cell[name] = match
        out.append(dataclasses.replace(run, cell=cell))
    return out


def _key(cell: Mapping[str, str], factors: Mapping[str, list[str]]) -> tuple[str, ...]:
    return tuple(cell[f] for f in factors)


def _seed_mean_items(runs: list[CellRun], doc_ids: list[int]) -> np.ndarray:
    """Each item's outcome averaged over the cell's seeds: one paired observation per item."""
    return np.array([[run.items[d] for d in doc_ids] for run in runs]).mean(axis=0)


def _mcnemar_runs(a: list[CellRun], b: list[CellRun]) -> tuple[CellRun, CellRun]:
    """The lowest seed both cells ran (same seed: same init and data order), else each one's lowest."""
    common = sorted({r.seed for r in a} & {r.seed for r in b})
    if common:
        return next(r for r in a if r.seed == common[0]), next(r for r in b if r.seed == common[0])
    return min(a, key=lambda r: r.seed), min(b, key=lambda r: r.seed)


def compare(factor: str, value: str, reference: str, runs_value: list[CellRun], runs_ref: list[CellRun],
            n_boot: int, seed: int) -> Comparison:
    """Paired comparison of two cells on the items every one of their runs scored."""
    doc_ids = sorted(set.intersection(*(set(r.items) for r in [*runs_value, *runs_ref])))
    if not doc_ids:
        raise ValueError(f"{factor}={value} and {factor}={reference} share no scored items")
    diffs = _seed_mean_items(runs_value, doc_ids) - _seed_mean_items(runs_ref, doc_ids)
    diff, low, high, p_boot = paired_bootstrap(diffs, n_boot, seed)
    run_v, run_r = _mcnemar_runs(runs_value, runs_ref)
    x = [run_v.items[d] for d in doc_ids]
    y = [run_r.items[d] for d in doc_ids]
    p_mc, counts = None, None
    if _is_binary(x) and _is_binary(y):
        counts = (sum(1 for i, j in zip(x, y) if i > j), sum(1 for i, j in zip(x, y) if i < j))
        p_mc = mcnemar_exact(*counts)
    return Comparison(factor, value, reference, diff, low, high, p_boot, p_mc, len(doc_ids), counts,
                      (run_v.seed, run_r.seed) if counts else None)


def summarize(runs: Sequence[CellRun], factors: Mapping[str, Sequence[Any]], reference: Mapping[str, Any] | None,
              metric: str, seed: int = 0, n_boot: int = 10000) -> AblationReport:
    """Per-cell mean and CI over seeds, and each factor value against the factor's reference value.

    `factors` maps factor -> its listed values (their order orders the report); the reference of a
    factor defaults to its first listed value. Each comparison holds the other factors at their
    reference values and is skipped, with a note, when either cell has no runs.
    """
    notes: list[str] = []
    listed = {f: [logged_value(v) for v in values] for f, values in factors.items()}
    ref = {f: logged_value((reference or {}).get(f, values[0] if values else None)) for f, values in listed.items()}
    for f, value in ref.items():
        if not any(_same_value(value, v) for v in listed[f]):
            raise ValueError(f"reference {f}={value} is not among the listed values {listed[f]}")
        ref[f] = next(v for v in listed[f] if _same_value(value, v))
    canonical = _canonical_cells(list(runs), listed, notes)
    by_cell: dict[tuple[str, ...], list[CellRun]] = {}
    for run in sorted(canonical, key=lambda r: r.seed):
        by_cell.setdefault(_key(run.cell, listed), []).append(run)

    cells = []
    for key in itertools.product(*listed.values()):
        cell_runs = by_cell.get(key)
        if not cell_runs:
            continue
        seeds = [r.seed for r in cell_runs]
        if len(set(seeds)) < len(seeds):
            # A rerun into the same parent: its replicates are not independent seeds, so say so.
            notes.append(f"{cell_label(dict(zip(listed, key)))}: a seed finished more than once {seeds}; all counted")
        scores = [r.score for r in cell_runs]
        mean, low, high = mean_ci(scores)
        cells.append(CellSummary(dict(zip(listed, key)), len(scores), mean, low, high, scores,
                                 [r.seed for r in cell_runs]))
    if any(c.n_seeds == 1 for c in cells):
        notes.append("cells with 1 seed have no spread over seeds: their CI is the mean itself")

    comparisons = []
    ref_cell = by_cell.get(_key(ref, listed))
    for factor, values in listed.items():
        for value in values:
            if value == ref[factor]:
                continue
            other = by_cell.get(_key({**ref, factor: value}, listed))
            if not ref_cell or not other:
                notes.append(f"{factor}={value} vs {ref[factor]}: a cell has no finished runs, not compared")
                continue
            comparisons.append(compare(factor, value, ref[factor], other, ref_cell, n_boot, seed))
    return AblationReport(metric, listed, ref, cells, comparisons, n_boot, seed, notes)



def cell_label(cell: Mapping[str, str], sep: str = ", ") -> str:
    return sep.join(f"{k}={v}" for k, v in cell.items())

