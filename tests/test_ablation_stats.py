"""Ablation statistics on synthetic data: numbers checked against printed tables, exact enumeration and
the pre-scipy implementation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from oracles import bootstrap_oracle, exact_mcnemar_oracle

from qsweep.report import ablation, ablation_report
from qsweep.report.ablation import CellRun, collect_cell_runs, mcnemar_exact, paired_bootstrap, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Student t 0.975 quantiles from a printed table.
T_TABLE = {1: 12.7062047, 2: 4.30265273, 4: 2.77644511, 9: 2.26215716, 29: 2.04522964}


def run(cell: dict[str, str], seed: int, outcomes: list[float], run_id: str | None = None) -> CellRun:
    """A run whose logged score is the mean of its items, as lm-eval's acc is."""
    items = dict(enumerate(outcomes))
    return CellRun(run_id or f"{cell}-{seed}", cell, seed, float(np.mean(outcomes)), items)


def correct_first(n_correct: int, n_items: int = 10) -> list[float]:
    return [1.0] * n_correct + [0.0] * (n_items - n_correct)


def is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 2000


# --------------------------------------------------------------------------- t quantile, CI


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_table(df: int):
    assert ablation.t_quantile(0.95, df) == pytest.approx(T_TABLE[df], abs=1e-7)


def test_summarize_means_and_cis_by_hand():
    runs = [run({"lora.r": "8"}, s, correct_first(k)) for s, k in enumerate([5, 6, 7])]
    runs += [run({"lora.r": "16"}, s, correct_first(k)) for s, k in enumerate([8, 8, 9])]
    report = summarize(runs, {"lora.r": ["8", "16"]}, None, "zorble/acc")

    r8, r16 = report.cells
    assert r8.cell == {"lora.r": "8"} and r8.n_seeds == 3 and r8.scores == [0.5, 0.6, 0.7]
    assert r8.mean == pytest.approx(0.6)
    half = T_TABLE[2] * 0.1 / math.sqrt(3)  # sd of 0.5, 0.6, 0.7 is 0.1
    assert (r8.ci_low, r8.ci_high) == (pytest.approx(0.6 - half, abs=1e-7), pytest.approx(0.6 + half, abs=1e-7))
    sd16 = math.sqrt(((0.8 - 25 / 30) ** 2 * 2 + (0.9 - 25 / 30) ** 2) / 2)
    assert r16.mean == pytest.approx(25 / 30)
    assert r16.ci_high - r16.mean == pytest.approx(T_TABLE[2] * sd16 / math.sqrt(3), abs=1e-7)

    (comparison,) = report.comparisons
    assert (comparison.factor, comparison.value, comparison.reference) == ("lora.r", "16", "8")
    # Items averaged over seeds per cell, then the mean of the paired differences.
    assert comparison.diff == pytest.approx(25 / 30 - 0.6)
    assert comparison.n_items == 10
    assert comparison.ci_low <= comparison.diff <= comparison.ci_high


def test_single_seed_ci_is_the_mean_and_is_said():
    runs = [run({"f": "a"}, 0, correct_first(4)), run({"f": "b"}, 0, correct_first(6))]
    report = summarize(runs, {"f": ["a", "b"]}, None, "t/acc", n_boot=200)
    assert len(report.cells) == 2 and all(c.ci_low == c.mean == c.ci_high for c in report.cells)
    assert any("1 seed" in note for note in report.notes)
    assert "n/a (1 seed)" in ablation_report.to_markdown(report)


# --------------------------------------------------------------------------- paired tests


def test_identical_items_give_zero_diff_and_p_one():
    outcomes = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    runs = [run({"f": v}, s, outcomes) for v in ("a", "b") for s in (0, 1)]
    (comparison,) = summarize(runs, {"f": ["a", "b"]}, None, "t/acc", n_boot=500).comparisons
    assert comparison.diff == 0.0
    assert comparison.ci_low == comparison.ci_high == 0.0
    assert comparison.p_bootstrap == 1.0
    assert comparison.p_mcnemar == 1.0
    assert comparison.mcnemar_counts == (0, 0)


def test_large_systematic_difference_is_significant_in_both_tests():
    n = 60
    runs = [run({"f": "a"}, s, correct_first(18, n)) for s in (0, 1)]
    runs += [run({"f": "b"}, s, [1.0] * n) for s in (0, 1)]
    (comparison,) = summarize(runs, {"f": ["a", "b"]}, None, "t/acc", n_boot=2000).comparisons
    assert comparison.diff == pytest.approx(0.7)
    assert comparison.p_bootstrap < 0.01
    assert comparison.p_mcnemar is not None and comparison.p_mcnemar < 0.01
    assert comparison.mcnemar_counts == (42, 0)
    assert comparison.p_mcnemar == pytest.approx(exact_mcnemar_oracle(42, 0), rel=1e-9)


def test_mcnemar_matches_hand_computed_binomial():
    # Two-sided exact: 2 * P(X <= 1), X ~ Binomial(6, 1/2) = 2 * (1 + 6) / 64.
    assert mcnemar_exact(5, 1) == pytest.approx(14 / 64)
    assert mcnemar_exact(1, 5) == pytest.approx(14 / 64)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    # 2 * P(X <= 3), X ~ Binomial(13, 1/2) = 2 * (1 + 13 + 78 + 286) / 8192
    assert mcnemar_exact(10, 3) == pytest.approx(2 * 378 / 8192)


@pytest.mark.parametrize("b, c", [(0, 1), (7, 2), (2, 7), (4, 4), (0, 25), (31, 12), (230, 190)])
def test_mcnemar_matches_exact_enumeration(b: int, c: int):
    assert mcnemar_exact(b, c) == pytest.approx(exact_mcnemar_oracle(b, c), rel=1e-9)


def test_mcnemar_uses_lowest_common_seed_and_counts_discordant_pairs():
    ref = [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    value = [1, 0, 1, 1, 1, 1, 1, 0, 1, 1]  # value right & ref wrong: 5; value wrong & ref right: 1
    runs = [run({"f": "a"}, 3, ref), run({"f": "b"}, 3, value),
            # seed 1 only in one cell and seed 7 noise in both: McNemar must use seed 3.
            run({"f": "a"}, 7, [0] * 10), run({"f": "b"}, 7, [1] * 10), run({"f": "b"}, 1, [0] * 10)]
    (comparison,) = summarize(runs, {"f": ["a", "b"]}, None, "t/acc", n_boot=200).comparisons
    assert comparison.mcnemar_seeds == (3, 3)
    assert comparison.mcnemar_counts == (5, 1)
    assert comparison.p_mcnemar == pytest.approx(14 / 64)


def test_non_binary_items_have_no_mcnemar():
    runs = [run({"f": "a"}, 0, [0.2, 0.5, 0.9]), run({"f": "b"}, 0, [0.3, 0.5, 1.0])]
    (comparison,) = summarize(runs, {"f": ["a", "b"]}, None, "t/score", n_boot=200).comparisons
    assert comparison.p_mcnemar is None and comparison.mcnemar_counts is None
    assert comparison.diff == pytest.approx(0.2 / 3)


def test_bootstrap_is_deterministic_for_a_fixed_seed():
    diffs = np.random.default_rng(1).normal(0.05, 0.5, size=200)
    first = paired_bootstrap(diffs, 3000, seed=11)
    assert paired_bootstrap(diffs, 3000, seed=11) == first
    assert paired_bootstrap(diffs, 3000, seed=12)[1:] != first[1:]
    assert first[0] == pytest.approx(diffs.mean())


@pytest.mark.parametrize("shift", [0.0, 0.1])
def test_bootstrap_ci_and_p_match_normal_theory(shift: float):
    diffs = np.random.default_rng(2).normal(shift, 1.0, size=400)
    observed, low, high, p = paired_bootstrap(diffs, 4000, seed=0)
    se = diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert (high - low) / 2 == pytest.approx(1.96 * se, rel=0.1)
    # Two-sided normal-theory p of the mean, 2 * P(Z > |z|); 4000 resamples carry ~0.01 of noise.
    assert p == pytest.approx(math.erfc(abs(observed / se) / math.sqrt(2)), abs=0.03)


@pytest.mark.parametrize("seed, n_items, n_boot", [(11, 200, 3000), (0, 57, 10000), (3, 10, 2500)])
def test_bootstrap_numbers_are_those_of_the_pre_scipy_implementation(seed: int, n_items: int, n_boot: int):
    diffs = np.random.default_rng(seed).choice([-1.0, 0.0, 0.0, 1.0], size=n_items)
    assert paired_bootstrap(diffs, n_boot, seed) == pytest.approx(bootstrap_oracle(diffs, n_boot, seed), abs=1e-12)


# --------------------------------------------------------------------------- cells, references, report


def two_factor_runs() -> list[CellRun]:
    """A one-factor-at-a-time design: reference (nf4, 8), then fp4 and r=16 each alone."""
    cells = {("nf4", "8"): 5, ("fp4", "8"): 4, ("nf4", "16"): 7}
    return [run({"quantization.quant_type": q, "lora.r": r}, s, correct_first(k + s % 2))
            for (q, r), k in cells.items() for s in (0, 1)]


def test_comparisons_hold_other_factors_at_reference_and_skip_missing_cells():
    factors = {"quantization.quant_type": ["nf4", "fp4"], "lora.r": [8, 16]}
    report = summarize(two_factor_runs(), factors, None, "zorble/acc", n_boot=300)
    assert report.reference == {"quantization.quant_type": "nf4", "lora.r": "8"}
    assert [c.cell for c in report.cells] == [
        {"quantization.quant_type": "nf4", "lora.r": "8"}, {"quantization.quant_type": "nf4", "lora.r": "16"},
        {"quantization.quant_type": "fp4", "lora.r": "8"}]
    assert [(c.factor, c.value, c.reference) for c in report.comparisons] == [
        ("quantization.quant_type", "fp4", "nf4"), ("lora.r", "16", "8")]
    assert report.comparisons[0].diff == pytest.approx(-0.1)
    assert report.comparisons[1].diff == pytest.approx(0.2)

    other = summarize(two_factor_runs(), factors, {"lora.r": 16}, "zorble/acc", n_boot=300)
    assert other.reference == {"quantization.quant_type": "nf4", "lora.r": "16"}
    assert [(c.factor, c.value) for c in other.comparisons] == [("lora.r", "8")]
    assert any("fp4 vs nf4" in note for note in other.notes)  # (fp4, 16) was never run


def test_logged_values_match_listed_values_numerically():
    runs = [run({"training.learning_rate": "0.0002"}, 0, correct_first(5)),
            run({"training.learning_rate": "0.001"}, 0, correct_first(6))]
    report = summarize(runs, {"training.learning_rate": [2e-4, 1e-3]}, None, "t/acc", n_boot=100)
    assert [c.cell["training.learning_rate"] for c in report.cells] == ["0.0002", "0.001"]
    assert len(report.comparisons) == 1 and not [n for n in report.notes if "not a listed value" in n]


def test_a_seed_finished_twice_is_noted_and_an_empty_report_still_plots(tmp_path: Path):
    runs = [run({"f": "a"}, 0, [1.0, 0.0]), run({"f": "a"}, 0, [1.0, 1.0], run_id="rerun")]
    report = summarize(runs, {"f": ["a", "b"]}, None, "t/acc", n_boot=100)
    assert report.cells[0].n_seeds == 2
    assert any("more than once" in note for note in report.notes)
    assert any("not compared" in note for note in report.notes)
    empty = summarize([], {"f": ["a", "b"]}, None, "t/acc")
    assert empty.cells == [] and empty.comparisons == []
    assert is_png(ablation_report.plot_cells(empty, tmp_path / "empty.png"))


def test_unknown_reference_is_an_error():
    with pytest.raises(ValueError, match="not among the listed values"):
        summarize([run({"f": "a"}, 0, [1.0])], {"f": ["a", "b"]}, {"f": "c"}, "t/acc")


def test_markdown_has_every_cell_and_comparison():
    factors = {"quantization.quant_type": ["nf4", "fp4"], "lora.r": [8, 16]}
    report = summarize(two_factor_runs(), factors, None, "zorble/acc", n_boot=300)
    text = ablation_report.to_markdown(report)
    # One-at-a-time: the reference cell and one cell per other value; one comparison per other value.
    assert (len(report.cells), len(report.comparisons)) == (3, 2)
    for cell in report.cells:
        assert ablation.cell_label(cell.cell) in text
        assert f"{cell.mean:.4f}" in text
    for c in report.comparisons:
        assert f"| {c.factor} | {c.value} | {c.reference} | {c.diff:+.4f} |" in text
    assert "(reference)" in text and "Method:" in text and "McNemar" in text
    assert json.loads(json.dumps(ablation.report_to_dict(report)))["metric"] == "zorble/acc"


def test_plot_cells_writes_a_png(tmp_path: Path):
    factors = {"quantization.quant_type": ["nf4", "fp4"], "lora.r": [8, 16]}
    report = summarize(two_factor_runs(), factors, None, "zorble/acc", n_boot=100)
    assert is_png(ablation_report.plot_cells(report, tmp_path / "cells.png"))


# --------------------------------------------------------------------------- per-item samples


def test_read_items_keeps_the_metrics_task_and_explains_missing_keys():
    lines = [json.dumps({"task": "zorble", "doc_id": 0, "acc": 1.0, "loglikelihoods": [-1, -2]}),
             json.dumps({"task": "other", "doc_id": 0, "acc": 0.0}),
             json.dumps({"task": "zorble", "doc_id": 3, "acc": 0.0}), ""]
    assert ablation.read_items(lines, "zorble/acc") == {0: 1.0, 3: 0.0}
    with pytest.raises(ValueError, match="per-item keys there: \\['acc'\\]"):
        ablation.read_items(lines, "zorble/acc_norm")
    with pytest.raises(ValueError, match="its tasks: \\['other', 'zorble'\\]"):
        ablation.read_items(lines, "mmlu/acc")
    with pytest.raises(ValueError, match="several records"):
        ablation.read_items(lines + lines, "zorble/acc")
    with pytest.raises(ValueError, match="TASK/NAME"):
        ablation.split_metric("acc")


def test_collect_cell_runs_from_a_real_mlflow_store(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from qsweep import tracking

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.create_experiment("ablate", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = tracking.start_run(client, experiment_id, "ablate", {"qsweep.kind": "sweep"})
    expected = {}
    outcomes = {("nf4", 0): [1, 0, 1, 1], ("nf4", 1): [1, 1, 1, 0], ("fp4", 0): [0, 0, 1, 0], ("fp4", 1): [1, 0, 0, 0]}
    for (quant, seed), items in outcomes.items():
        child = tracking.start_run(client, experiment_id, f"t-{quant}-{seed}", {
            "mlflow.parentRunId": parent, "qsweep.kind": "trial", "qsweep.outcome": "finished"})
        config = {"quantization": {"quant_type": quant}, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
                  "training": {"seed": seed}}
        tracking.log_batch(client, child, params=tracking.flatten(config),
                           metrics={"zorble/acc": float(np.mean(items)), "eval_loss": 1.0})
        lines = [{"task": "zorble", "doc_id": i, "target": 0, "acc": float(a), "loglikelihoods": [-1.0, -2.0]}
                 for i, a in enumerate(items)]
        lines.append({"task": "other", "doc_id": 0, "target": 1, "acc": 1.0})
        client.log_text(child, "".join(json.dumps(line) + "\n" for line in lines), ablation.SAMPLES_ARTIFACT)
        tracking.end_run(client, child, "FINISHED")
        expected[child] = (quant, seed, items)
    failed = tracking.start_run(client, experiment_id, "t-failed", {
        "mlflow.parentRunId": parent, "qsweep.kind": "trial", "qsweep.outcome": "oom"})
    tracking.end_run(client, failed, "FAILED")

    factors = {"quantization.quant_type": ["nf4", "fp4"], "lora.target_modules": [["q_proj", "v_proj"]]}
    runs = collect_cell_runs(client, experiment_id, parent, factors, "zorble/acc")

    assert sorted(r.run_id for r in runs) == sorted(expected)
    for r in runs:
        quant, seed, items = expected[r.run_id]
        assert r.cell == {"quantization.quant_type": quant, "lora.target_modules": "q_proj,v_proj"}
        assert r.seed == seed
        assert r.items == {i: float(a) for i, a in enumerate(items)}
        assert r.score == pytest.approx(np.mean(items))

    report = summarize(runs, factors, None, "zorble/acc", n_boot=500)
    assert [c.mean for c in report.cells] == [pytest.approx(0.75), pytest.approx(0.25)]
    assert report.comparisons[0].diff == pytest.approx(-0.5)
    ablation_report.log_report(client, parent, report, tmp_path / "report")
    logged = {f.path for f in client.list_artifacts(parent, "ablation")}
    assert logged == {f"ablation/{ablation_report.REPORT_MD}", f"ablation/{ablation_report.REPORT_JSON}",
                      f"ablation/{ablation_report.CELLS_PNG}"}
