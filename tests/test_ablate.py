"""A small ablation end to end (tiny model, 2 values x 2 seeds): the report's numbers equal those
recomputed by hand from the per-item outputs logged on each trial's MLflow run."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from oracles import bootstrap_oracle, exact_mcnemar_oracle
from sweep_bench import SweepBench

from qsweep.tracking import client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory, tiny_sweep_base, sweep_bench) -> dict:
    workdir = tmp_path_factory.mktemp("ablation")
    config = copy.deepcopy(tiny_sweep_base)
    config.pop("search")
    config["name"] = "abl"
    config["evaluation"]["limit"] = 16
    config["ablation"] = {"factors": {"quantization.quant_type": ["nf4", "fp4"]}, "seeds": [0, 1],
                          "metric": "zorble/acc"}
    result = sweep_bench.invoke("ablate", sweep_bench.write(workdir, config, name="ablation.yaml"))
    return {"result": result, "workdir": workdir, "uri": config["tracking"]["uri"]}


def _per_item(uri: str) -> dict[tuple[str, int], dict[int, float]]:
    mlflow_client = client(uri)
    items = {}
    for run in SweepBench.runs(uri, "abl"):
        local = mlflow_client.download_artifacts(run.info.run_id, "lm_eval_samples.jsonl")
        rows = [json.loads(line) for line in Path(local).read_text().splitlines()]
        key = (run.data.params["quantization.quant_type"], int(run.data.params["training.seed"]))
        items[key] = {r["doc_id"]: r["acc"] for r in rows}
    return items


def test_the_ablation_runs_every_cell_and_seed(ablation_run):
    result = ablation_run["result"]
    assert result.exit_code == 0, result.output
    assert "finished 4, failed 0" in result.output
    assert set(_per_item(ablation_run["uri"])) == {("nf4", 0), ("nf4", 1), ("fp4", 0), ("fp4", 1)}


def test_report_numbers_equal_those_recomputed_from_logged_items(ablation_run):
    report = json.loads((ablation_run["workdir"] / "runs" / "abl" / "report" / "ablation_report.json").read_text())
    items = _per_item(ablation_run["uri"])
    assert sorted(cell["cell"]["quantization.quant_type"] for cell in report["cells"]) == ["fp4", "nf4"]
    for cell in report["cells"]:
        quant = cell["cell"]["quantization.quant_type"]
        scores = [sum(items[(quant, seed)].values()) / len(items[(quant, seed)]) for seed in (0, 1)]
        mean = sum(scores) / 2
        sd = math.sqrt(sum((s - mean) ** 2 for s in scores))
        half = 12.706204736174707 * sd / math.sqrt(2)
        assert cell["mean"] == pytest.approx(mean, abs=1e-12)
        assert cell["ci_low"] == pytest.approx(mean - half, abs=1e-9)
        assert cell["ci_high"] == pytest.approx(mean + half, abs=1e-9)
    (comparison,) = report["comparisons"]
    assert (comparison["value"], comparison["reference"]) == ("fp4", "nf4")
    docs = sorted(items[("nf4", 0)])
    diff = sum((items[("fp4", 0)][d] + items[("fp4", 1)][d]) / 2 - (items[("nf4", 0)][d] + items[("nf4", 1)][d]) / 2
               for d in docs) / len(docs)
    assert comparison["diff"] == pytest.approx(diff, abs=1e-12)
    diffs = np.array([(items[("fp4", 0)][d] + items[("fp4", 1)][d]) / 2
                      - (items[("nf4", 0)][d] + items[("nf4", 1)][d]) / 2 for d in docs])
    _, low, high, p = bootstrap_oracle(diffs, report["n_boot"], report["seed"])
    assert comparison["ci_low"] == pytest.approx(low, abs=1e-12)
    assert comparison["ci_high"] == pytest.approx(high, abs=1e-12)
    assert comparison["p_bootstrap"] == pytest.approx(p, abs=1e-12)
    # Discordant pairs of seed 0 (the lowest both cells ran): fp4 right & nf4 wrong, and the reverse.
    b = sum(1 for d in docs if items[("fp4", 0)][d] == 1 and items[("nf4", 0)][d] == 0)
    c = sum(1 for d in docs if items[("fp4", 0)][d] == 0 and items[("nf4", 0)][d] == 1)
    assert comparison["mcnemar_counts"] == [b, c]
    assert comparison["p_mcnemar"] == pytest.approx(exact_mcnemar_oracle(b, c), rel=1e-9)


def test_report_and_plot_are_on_the_parent_run(ablation_run):
    mlflow_client = client(ablation_run["uri"])
    (parent,) = SweepBench.runs(ablation_run["uri"], "abl", "sweep")
    names = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "ablation")}
    assert {"ablation/ablation_report.md", "ablation/ablation_report.json", "ablation/ablation_cells.png"} <= names


def test_the_printed_tables_carry_the_reports_numbers(ablation_run):
    """The markdown tables `qsweep ablate` prints: one row per cell and the fp4-vs-nf4 comparison,
    each cell holding the report's own numbers (checked against the logged items above)."""
    report = json.loads((ablation_run["workdir"] / "runs" / "abl" / "report" / "ablation_report.json").read_text())
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in ablation_run["result"].output.splitlines() if line.startswith("|")]
    assert len(report["cells"]) == 2
    for cell in report["cells"]:
        quant = cell["cell"]["quantization.quant_type"]
        label = f"quantization.quant_type={quant}" + (" (reference)" if cell["cell"] == report["reference"] else "")
        assert [label, "2", f"{cell['mean']:.4f}", f"[{cell['ci_low']:.4f}, {cell['ci_high']:.4f}]"] in [
            row[:4] for row in rows], (label, rows)
    (comparison,) = report["comparisons"]
    assert ["quantization.quant_type", "fp4", "nf4", f"{comparison['diff']:+.4f}",
            f"[{comparison['ci_low']:+.4f}, {comparison['ci_high']:+.4f}]"] in [row[:5] for row in rows], rows


def test_the_html_report_carries_the_ablation_tables(ablation_run):
    folder = ablation_run["workdir"] / "runs" / "abl"
    cells = json.loads((folder / "report" / "ablation_report.json").read_text())["cells"]
    section = (folder / "report.html").read_text().split("<h2>Ablation</h2>")[1]
    assert len(cells) == 2
    for cell in cells:
        assert f"quantization.quant_type={cell['cell']['quantization.quant_type']}" in section
        assert f"{cell['mean']:.4f}" in section
