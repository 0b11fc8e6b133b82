"""Ablation statistics and search insight: what the driver reports after the runs are logged.

Ablation: a grid of cells (factor -> value), several seeds per cell. Each cell gets a mean over its
seeds with a Student-t 95% CI (seeds are the replicates that vary), and each non-reference value of
a factor is compared with the factor's reference value on the *same items* of the lm-eval task:
a paired bootstrap over items and an exact McNemar test. Pairing on items removes the item-to-item
difficulty variance, which with small eval sets dwarfs the effect being measured.

Search insight: Optuna's parameter importances and optimization history of a finished sweep.

Everything reads what the driver already logged (MLflow child runs, per-item samples, the Optuna
study), so a report can be recomputed from the tracking store alone. No scipy: the t quantile and
the binomial tail are computed here exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

SAMPLES_ARTIFACT = "lm_eval_samples.jsonl"
SEED_PARAM = "training.seed"
CONFIDENCE = 0.95
# Bootstrap replicates resampled per block: bounds memory at n_items x block indices.
BOOT_BLOCK = 1000
# Float noise in resampled means must not turn "as extreme as observed" into "less extreme".
P_EPS = 1e-12
REPORT_MD = "ablation_report.md"
REPORT_JSON = "ablation_report.json"
CELLS_PNG = "ablation_cells.png"
INSIGHT_JSON = "search_insight.json"
IMPORTANCE_PNG = "param_importances.png"
HISTORY_PNG = "optimization_history.png"


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


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df (Abramowitz & Stegun 26.7.3/26.7.4, exact)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term, total = 1.0, 1.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| < t) = confidence, by bisection on the exact two-sided mass."""
    low, high = 0.0, 1.0
    while t_two_sided_mass(high, df) < confidence:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_two_sided_mass(mid, df) < confidence:
            low = mid
        else:
            high = mid
        if high - low < 1e-13:
            break
    return (low + high) / 2


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

    The CI is the percentile interval of the resampled means. The p-value shifts that distribution
    to mean 0 (the null of no difference) and counts replicates at least as far from 0 as the
    observed mean, with +1 in numerator and denominator so p is never reported as exactly 0.
    """
    diffs = np.asarray(diffs, dtype=float)
    observed = float(diffs.mean())
    rng = np.random.default_rng(seed)
    n = len(diffs)
    means = np.empty(n_boot)
    for start in range(0, n_boot, BOOT_BLOCK):
        size = min(BOOT_BLOCK, n_boot - start)
        means[start:start + size] = diffs[rng.integers(0, n, size=(size, n))].mean(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    extreme = int(np.count_nonzero(np.abs(means - observed) >= abs(observed) - P_EPS))
    return observed, float(low), float(high), (extreme + 1) / (n_boot + 1)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar: discordant pairs ~ Binomial(b + c, 1/2) under the null."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    # Integer true division is exact-then-rounded in Python, so huge n neither overflows nor drifts.
    return min(1.0, 2 * tail / 2**n)


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


# --------------------------------------------------------------------------- markdown


def cell_label(cell: Mapping[str, str], sep: str = ", ") -> str:
    return sep.join(f"{k}={v}" for k, v in cell.items())


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def to_markdown(report: AblationReport) -> str:
    ref_label = cell_label(report.reference)
    lines = [f"# Ablation: {report.metric}", "", f"Reference: {ref_label}", "",
             "| cell | seeds | mean | 95% CI | per-seed scores |", "|---|---:|---:|---|---|"]
    for c in report.cells:
        mark = " (reference)" if c.cell == report.reference else ""
        ci = f"[{c.ci_low:.4f}, {c.ci_high:.4f}]" if c.n_seeds > 1 else "n/a (1 seed)"
        scores = ", ".join(f"{s:.4f} (seed {seed})" for s, seed in zip(c.scores, c.seeds))
        lines.append(f"| {cell_label(c.cell)}{mark} | {c.n_seeds} | {c.mean:.4f} | {ci} | {scores} |")
    lines += ["", "| factor | value | vs | diff | 95% CI | p (bootstrap) | p (McNemar) | discordant | items |",
              "|---|---|---|---:|---|---:|---:|---|---:|"]
    for c in report.comparisons:
        disc = f"{c.mcnemar_counts[0]} / {c.mcnemar_counts[1]}" if c.mcnemar_counts else "n/a"
        lines.append(f"| {c.factor} | {c.value} | {c.reference} | {c.diff:+.4f} | [{c.ci_low:+.4f}, {c.ci_high:+.4f}] "
                     f"| {_fmt_p(c.p_bootstrap)} | {_fmt_p(c.p_mcnemar)} | {disc} | {c.n_items} |")
    if not report.comparisons:
        lines.append("| (none) | | | | | | | | |")
    lines += ["", (
        f"Method: cell mean over seeds of the logged {report.metric}, 95% CI Student t over seeds. "
        f"diff = value minus reference, other factors at reference; items averaged over each cell's seeds, "
        f"paired bootstrap over items ({report.n_boot} resamples, seed {report.seed}): percentile CI and "
        f"two-sided p from the null-centred distribution. McNemar: exact two-sided binomial on the 0/1 items "
        f"of the lowest seed both cells ran (discordant = value right & reference wrong / the reverse).")]
    if report.notes:
        lines += ["", "Notes:", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    # A bare Figure, not pyplot: no global state or GUI backend inside the driver process.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _tick_label(cell: Mapping[str, str], width: int = 16) -> str:
    """Values only (the x-axis label names the factors), wrapped so long lists stay readable."""
    return "\n".join(textwrap.fill(v.replace(",", ", "), width) for v in cell.values())


def _y_limits(cells: list[CellSummary]) -> tuple[float, float]:
    """Bars start at 0; a metric whose scores all lie in [0, 1] (acc, exact_match) is drawn on
    [0, 1], so a wide few-seed t interval cannot squash the bars into a strip."""
    scores = [s for c in cells for s in c.scores]
    low = min([c.ci_low for c in cells] + scores + [0.0])
    high = max([c.ci_high for c in cells] + scores)
    if 0.0 <= min(scores) and max(scores) <= 1.0:
        return 0.0, min(high + 0.08, 1.0)
    return low, high + 0.1 * (high - low or 1.0)


def plot_cells(report: AblationReport, path: Path | str) -> Path:
    """One idea: how each cell scores, with its uncertainty over seeds."""
    path = Path(path)
    cells = report.cells
    if not cells:
        return _message_plot(path, f"{report.metric} per cell", "No cell has a finished run.")
    multi_seed = any(c.n_seeds > 1 for c in cells)
    fig = _figure(max(6.0, 1.25 * len(cells) + 2.5), 4.8)
    ax = fig.add_subplot()
    x = np.arange(len(cells))
    errors = np.array([[c.mean - c.ci_low for c in cells], [c.ci_high - c.mean for c in cells]])
    colors = ["#4c72b0" if c.cell != report.reference else "#8c8c8c" for c in cells]
    ax.bar(x, [c.mean for c in cells], yerr=errors if multi_seed else None, capsize=6, color=colors,
           edgecolor="black", linewidth=0.6, error_kw={"elinewidth": 1.2})
    low, high = _y_limits(cells)
    for i, c in enumerate(cells):
        if c.n_seeds > 1:
            ax.scatter(np.full(len(c.scores), i) + np.linspace(-0.15, 0.15, len(c.scores)), c.scores, s=18,
                       color="black", zorder=3)
        # At the bar's base, boxed: clear of error bars and seed dots, and readable on any bar height.
        ax.annotate(f"{c.mean:.3f}", (i, max(low, 0.0)), xytext=(0, 4), textcoords="offset points", ha="center",
                    va="bottom", fontsize=9, bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none"})
    ax.set_xticks(x, [_tick_label(c.cell) for c in cells], fontsize=9)
    ax.set_xlabel(" / ".join(report.factors) + "   (grey bar: reference)")
    ax.set_ylabel(report.metric)
    ax.set_ylim(low, high)
    seeds = sorted({c.n_seeds for c in cells})
    seed_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    title = f"{report.metric} per cell: mean of {seed_text} seed(s)"
    if multi_seed:
        title += " with 95% CI (dots: one seed each)"
        if any(c.ci_low < low or c.ci_high > high for c in cells):
            title += "\nsome CIs run past the axis: with few seeds the t interval is wide"
    else:
        title += ", no CI with one seed"
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.savefig(path)
    return path


def _message_plot(path: Path, title: str, message: str) -> Path:
    """An explanatory image in place of a plot that cannot be drawn, so the artifact says why."""
    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, textwrap.fill(message, 60), ha="center", va="center", fontsize=11, transform=ax.transAxes)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------- search insight


def _evaluator() -> tuple[Any, str]:
    """fANOVA (Optuna's default, seeded) when scikit-learn is there, which MLflow pulls in;
    PED-ANOVA, which needs nothing beyond Optuna and numpy, otherwise."""
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    try:
        import sklearn  # noqa: F401
    except ImportError:
        return PedAnovaImportanceEvaluator(), "ped_anova"
    return FanovaImportanceEvaluator(seed=0), "fanova"


def _json_safe(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _history(study: Any) -> tuple[str, list[dict[str, Any]]]:
    """(direction, one entry per trial in order) with the best complete value so far."""
    import optuna
    from optuna.trial import TrialState

    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials, best = [], None
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        value = t.value if t.state == TrialState.COMPLETE else None
        if value is not None:
            best = value if best is None else (max(best, value) if maximize else min(best, value))
        trials.append({"number": t.number, "state": t.state.name, "value": value,
                       "best_so_far": best if value is not None else None,
                       "params": {k: _json_safe(v) for k, v in t.params.items()}})
    return ("maximize" if maximize else "minimize"), trials


def search_insight(study: Any) -> dict[str, Any]:
    """Parameter importances and per-trial history of a single-objective study, JSON-ready."""
    import optuna

    direction, trials = _history(study)
    complete = sum(1 for t in trials if t["value"] is not None)
    evaluator, name = _evaluator()
    importances: dict[str, float] = {}
    note = ""
    if complete < 2:
        note = f"only {complete} complete trial(s), and importances need at least 2"
        name = None
    else:
        try:
            raw = optuna.importance.get_param_importances(study, evaluator=evaluator)
            importances = {k: float(v) for k, v in raw.items()}
        # Insight is a by-product of a finished sweep: failing here must not fail the sweep.
        except Exception as exc:  # noqa: BLE001
            logger.warning("parameter importances failed: %s", exc)
            note = f"importances failed: {exc}"
        if not importances and not note:
            note = "no parameter varied across the complete trials"
    return {"study": study.study_name, "direction": direction, "evaluator": name, "n_trials": len(trials),
            "n_complete": complete, "importances": importances, "note": note, "trials": trials}


EVALUATOR_LABELS = {"fanova": "fANOVA importance (share of objective variance)",
                    "ped_anova": "PED-ANOVA importance (normalized to sum 1)"}


def plot_importances(insight: Mapping[str, Any], path: Path | str, metric: str = "objective") -> Path:
    """One idea: which hyperparameters moved the objective, largest on top."""
    path = Path(path)
    importances = insight["importances"]
    if not importances:
        return _message_plot(path, f"Parameter importances for {metric}",
                             f"Not computed: {insight.get('note') or 'no importances'}.")
    names = list(importances)[::-1]
    values = [importances[n] for n in names]
    fig = _figure(7.0, max(2.8, 0.45 * len(names) + 1.6))
    ax = fig.add_subplot()
    ax.barh(names, values, color="#4c72b0", edgecolor="black", linewidth=0.6)
    for y, v in enumerate(values):
        ax.annotate(f"{v:.1%}", (v, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=9)
    from matplotlib.ticker import PercentFormatter

    ax.set_xlim(0, max(values) * 1.18 or 1.0)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel(EVALUATOR_LABELS.get(insight.get("evaluator") or "", "importance"))
    ax.set_ylabel("hyperparameter")
    ax.set_title(f"Hyperparameter importance for {metric}\n(from {insight['n_complete']} complete trials)",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    fig.savefig(path)
    return path


def plot_history(study: Any, path: Path | str, metric: str = "objective") -> Path:
    """One idea: how the objective evolved over trials, with the best value found so far."""
    path = Path(path)
    direction, trials = _history(study)
    scored = [t for t in trials if t["value"] is not None]
    unscored = len(trials) - len(scored)
    if not scored:
        return _message_plot(path, f"Optimization history of {metric}",
                             f"No trial finished with a score ({len(trials)} trial(s) in the study).")
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    numbers = [t["number"] for t in scored]
    ax.scatter(numbers, [t["value"] for t in scored], s=24, color="#4c72b0", label="trial score", zorder=3)
    ax.step(numbers, [t["best_so_far"] for t in scored], where="post", color="#dd8452", linewidth=2,
            label=f"best so far ({direction})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers are whole
    ax.set_xlabel("trial number")
    ax.set_ylabel(metric)
    extra = f", {unscored} stopped early or failed (no score)" if unscored else ""
    ax.set_title(f"Optimization history of {metric}: {len(scored)} scored trials{extra}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------- logging to MLflow


def log_report(mlflow_client: Any, run_id: str, report: AblationReport, folder: Path | str) -> list[Path]:
    """Writes the markdown, JSON and plot to `folder` and logs them to the run under `ablation/`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_MD).write_text(to_markdown(report))
    (folder / REPORT_JSON).write_text(json.dumps(report_to_dict(report), indent=2))
    files = [folder / REPORT_MD, folder / REPORT_JSON, plot_cells(report, folder / CELLS_PNG)]
    for path in files:
        mlflow_client.log_artifact(run_id, str(path), artifact_path="ablation")
    return files


def log_search_insight(mlflow_client: Any, run_id: str, study: Any, folder: Path | str,
                       metric: str = "objective") -> dict[str, Any]:
    """Writes importances (JSON + PNG) and history (PNG) and logs them under `search_insight/`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    insight = search_insight(study)
    (folder / INSIGHT_JSON).write_text(json.dumps(insight, indent=2))
    files = [folder / INSIGHT_JSON, plot_importances(insight, folder / IMPORTANCE_PNG, metric),
             plot_history(study, folder / HISTORY_PNG, metric)]
    for path in files:
        mlflow_client.log_artifact(run_id, str(path), artifact_path="search_insight")
    return insight


def load_study(folder: Path | str, name: str) -> Any:
    """The sweep's Optuna study as qsweep.search.searcher.build_searcher stores it: `<folder>/optuna.db`, named after the sweep."""
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{Path(folder) / 'optuna.db'}")
