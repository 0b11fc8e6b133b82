"""Everything checkable before training: one list of problems, each naming the field and the fix.

Each check lives in the preflight module of its concern (space, data, asha, evaluation, model,
tracking, output, fit) and returns its problems (an empty list when all is well), so
`validate_sweep` reports every mistake at once instead of stopping at the first. Nothing here
trains, starts Ray, or writes tracking files or qsweep's cache: a sweep that fails validation
leaves no trace (model files it needs are written to a scratch folder removed at the end). One
exception, see preflight.model: an embedded SmolLM2 whose GGUF file is not on this machine yet is
downloaded and built as before, since its config cannot be had without the file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from qsweep.config.schema import SweepConfig, SweepFileError
from qsweep.preflight.asha import check_asha
from qsweep.preflight.data import check_data, check_template_for_rows, check_tokenized_rows
from qsweep.preflight.evaluation import check_metrics, check_tasks
from qsweep.preflight.fit import check_fits
from qsweep.preflight.lora import check_lora, check_steps
from qsweep.preflight.mmlu import check_mmlu
from qsweep.preflight.model import check_targets, model_folder
from qsweep.preflight.output import check_output_dir
from qsweep.preflight.space import check_baselines, check_when_values, load_space_of
from qsweep.preflight.tracking import check_tracking
from qsweep.search.space import SearchSpace, check_space


def _check_model(sweep: SweepConfig, space: SearchSpace | None, data_ok: bool,
                 scratch: Path) -> tuple[Path | None, list[str]]:
    """The model's folder and the problems of its targets and, when the data read well, its lengths."""
    folder, problems = model_folder(sweep, scratch)
    if folder is None:
        return None, problems
    problems = check_targets(sweep, space, folder)
    problems += check_lora(sweep, space, folder)
    if data_ok:
        problems += check_tokenized_rows(sweep.trial(), sweep.base_dir, folder)
    return folder, problems


def validate_sweep(sweep: SweepConfig, source: str, space: SearchSpace | None = None) -> SearchSpace | None:
    """Raises SweepFileError with every problem found; returns the search space, loaded from
    search.space unless one is given (an ablation builds its own)."""
    if space is None:
        space, space_file, problems = load_space_of(sweep)
    else:
        space_file, problems = "ablation", [f"ablation: {p}" for p in check_space(space, sweep.trial())]
    if space is not None:
        problems += check_when_values(space, space_file)
    problems += check_baselines(sweep, space)
    data_problems = check_data(sweep)
    problems += data_problems
    problems += check_asha(sweep)
    problems += check_steps(sweep, space)
    problems += check_tasks(sweep.trial(), sweep.base_dir)
    problems += check_mmlu(sweep)
    problems += check_metrics(sweep)
    with tempfile.TemporaryDirectory(prefix="qsweep-preflight-") as scratch:
        folder, model_problems = _check_model(sweep, space, not data_problems, Path(scratch))
        problems += model_problems
        problems += check_tracking(sweep.tracking.uri)
        problems += check_output_dir(sweep.output_dir)
        if not problems and folder is not None:
            problems += check_fits(sweep, space, folder)
    if problems:
        raise SweepFileError(source, problems)
    return space


def check_previewable(sweep: SweepConfig, scratch: Path) -> tuple[Path | None, list[str]]:
    """What `qsweep preview` needs: data that reads, the model's tokenizer, and a chat template
    where the rows need one; rows that would be cut are what it shows, not problems."""
    problems = check_data(sweep)
    folder, model_problems = model_folder(sweep, scratch)
    problems += model_problems
    if not problems and folder is not None:
        problems += check_template_for_rows(sweep.trial(), sweep.base_dir, folder)[1]
    return folder, problems
