"""The end-to-end tests' shared steps: write a sweep into a folder with its own MLflow store and
outputs, run a qsweep command on it in-process, read back its runs (fixture `sweep_bench`)."""

from __future__ import annotations

from pathlib import Path


class SweepBench:
    """Write a sweep into a folder with its own MLflow store and outputs, run a qsweep command on it
    in-process, and read back its runs: what every end-to-end test does first."""

    @staticmethod
    def write(workdir: Path, sweep: dict, experiment: str | None = None, name: str = "sweep.yaml") -> Path:
        import yaml

        sweep["tracking"] = {"uri": f"sqlite:///{workdir}/mlflow.db", "experiment": experiment or sweep["name"]}
        sweep["output_dir"] = str(workdir / "runs")
        path = workdir / name
        path.write_text(yaml.safe_dump(sweep, sort_keys=False))
        return path

    @staticmethod
    def invoke(*args: str):
        from typer.testing import CliRunner

        from qsweep.cli import app

        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    @staticmethod
    def runs(uri: str, experiment: str, kind: str = "trial", order_by: list[str] | None = None) -> list:
        """Every run of that kind (`trial` or `sweep`); none while the experiment does not exist yet."""
        from qsweep.tracking import client

        mlflow_client = client(uri)
        found = mlflow_client.get_experiment_by_name(experiment)
        if found is None:
            return []
        return mlflow_client.search_runs([found.experiment_id], filter_string=f"tags.`qsweep.kind` = '{kind}'",
                                         order_by=order_by or [])
