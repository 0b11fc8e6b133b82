"""The sweep file: pydantic models, loading, and errors that name the field and the fix.

A sweep file holds the base trial (model, data, quantization, lora, training, evaluation) plus
how to search around it. A resolved trial is the same models with the search's choices applied,
so `qsweep show` can write any trial back out as a valid single-trial sweep file.

Longer than 400 lines because it holds every section of the sweep file in one place (a user reads
one module to learn every key), each model with its own cross-field checks.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qsweep.config.paths import resolve_path

# MLflow's own default since 3.14 refuses the old ./mlruns file store; $MLFLOW_TRACKING_URI wins.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# The flattened param that holds a trial's seed: an ablation's replicate axis.
SEED_PARAM = "training.seed"
# A tied search param (search.space) is searched as its ratio, named `lora.alpha-per-lora.r`.
RATIO_JOIN = "-per-"
# The param holding a trial's optimizer steps: max_steps, or what num_epochs make of the training set.
TOTAL_STEPS_PARAM = "total_steps"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = Field("smollm2-135m", description="embedded name, local folder or hub id")
    revision: str | None = None
    trust_remote_code: bool = False


class DataConfig(Strict):
    train: str = Field(
        description="jsonl/json/csv file or dataset folder (relative to the sweep file), or hub dataset id"
    )
    validation: str | None = None
    validation_split: str = Field(
        "validation", description="the split of a hub dataset `validation` is read from; a local file has one"
    )
    # None = not set: plain rows then use `{prompt}` / ` {completion}`, and rows holding conversations
    # (a `messages` column, or `prompt` and `completion` message lists) are rendered with the chat template.
    prompt: str | None = Field(None, description="Python format string over the row's columns (plain rows)")
    completion: str | None = Field(None, description="the part the loss is computed on (plain rows)")
    messages: str | None = Field(
        None, description="the column holding each row's conversation (a list of {role, content}); "
        "default: `messages` when the rows have it and prompt/completion are not set"
    )
    chat_template: str | None = Field(
        None, description="a .jinja file (relative to the sweep file) replacing the model's chat template"
    )
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="conversations: the loss on every assistant turn, or on the last only"
    )
    max_seq_length: int = Field(256, ge=8)

    @model_validator(mode="after")
    def _conversation_or_format_strings(self) -> "DataConfig":
        if self.messages is not None and (self.prompt is not None or self.completion is not None):
            raise ValueError("`messages` names a conversation column, rendered with the chat template; remove "
                             "`prompt` and `completion` (format strings for plain rows)")
        return self


class QuantizationConfig(Strict):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class LoraConfig(Strict):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field(
        "all-linear", description="preset (attention, mlp, all-linear) or module names"
    )
    use_dora: bool = Field(False, description="DoRA: a trained magnitude per output row (peft use_dora)")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases train (peft's bias)")
    layers_to_transform: list[int] | None = Field(
        None, description="decoder layers (0-based) LoRA wraps, as a list or text such as '0-3,8'; null = all"
    )

    @field_validator("layers_to_transform", mode="before")
    @classmethod
    def _layers_from_text(cls, value: Any) -> Any:
        # A search space can only name scalars (Optuna's categorical choices), so a set of layers may
        # also be written as text: "12-23" or "0,2,4".
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int):
            return [value]
        if isinstance(value, str):
            try:
                return expand_ranges(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a list of layers; write e.g. [0, 1, 2], '0-2' or '0-3,8'") from None
        return value

    @field_validator("layers_to_transform")
    @classmethod
    def _layers_listed(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value or min(value) < 0:
            raise ValueError("give at least one layer, each 0 or more (the first decoder layer is 0)")
        return sorted(set(value))


# Training steps when neither training.max_steps nor training.num_epochs is given.
DEFAULT_MAX_STEPS = 100


def expand_ranges(text: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8]; ValueError on anything else."""
    numbers: list[int] = []
    for part in text.split(","):
        if not (found := re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)):
            raise ValueError(part)
        numbers += range(int(found[1]), int(found[2] or found[1]) + 1)
    return numbers


class TrainingConfig(Strict):
    max_steps: int | None = Field(
        None, ge=1, description=f"optimizer steps; {DEFAULT_MAX_STEPS} when num_epochs is not set either"
    )
    num_epochs: float | None = Field(None, gt=0, description="passes over the training set, instead of max_steps")
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    gradient_checkpointing: bool = False
    optimizer: Literal["auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"] = "auto"
    eval_every: int = Field(10, ge=1, description="steps between validation-loss reports (ASHA's rungs)")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: lora_B learns at this multiple of learning_rate (peft create_loraplus_optimizer)"
    )
    neftune_noise_alpha: float | None = Field(None, gt=0, description="NEFTune: noise added to the input embeddings")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainingConfig":
        if self.max_steps is not None and self.num_epochs is not None:
            raise ValueError("training.max_steps and training.num_epochs are both set; keep one (epochs are "
                             "turned into steps from the training set's size)")
        if self.max_steps is None and self.num_epochs is None:
            # Written past validate_assignment: the default is not a field the user set.
            self.__dict__["max_steps"] = DEFAULT_MAX_STEPS
        return self

    def total_steps(self, train_rows: int) -> int:
        """Optimizer steps of a trial on `train_rows` rows: max_steps, or what the Trainer makes of
        num_epochs (Trainer.set_initial_training_values: ceil(epochs x updates per epoch), an epoch
        being ceil(rows / batch) batches in ceil(batches / accumulation) updates, at least 1)."""
        if self.max_steps is not None:
            return self.max_steps
        batches = math.ceil(train_rows / self.batch_size)
        per_epoch = max(math.ceil(batches / self.gradient_accumulation_steps), 1)
        return math.ceil(self.num_epochs * per_epoch)


class LimitsConfig(Strict):
    """What one trial may use; going over ends that trial alone, as its own failure."""

    time_budget_s: float | None = Field(None, gt=0, description="a trial still running after this is ended as timed out")
    max_loss_ratio: float | None = Field(
        100.0, gt=1, description="a training loss above this multiple of the first logged one ends the trial as diverged"
    )
    memory_mb: float | None = Field(
        None, gt=0, description="memory cap of the trial's process (GPU memory on CUDA); null = its own estimate"
    )


class FinalStageConfig(Strict):
    """After the search, the best trials by the cheap score are scored again on more items, and on
    tasks too costly to score on every trial (a "does not forget" guard such as MMLU)."""

    top_k: int = Field(3, ge=1)
    tasks: list[str] = Field(
        default_factory=list, description="extra tasks scored only in the final stage, on the top_k and on the "
        "untuned base (once per 4-bit type, cached), beside evaluation.tasks"
    )
    limit: int | None = Field(None, ge=1, description="items per task in the final stage; null = every item")
    per_subject: int | None = Field(
        None, ge=1, description="items per subtask of a group task (mmlu) in the final stage; null = every item"
    )


class EvaluationConfig(Strict):
    tasks: list[str] = Field(default_factory=lambda: ["zorble"], min_length=1)
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(
        None, ge=1, description="score a seeded random subset of N items per task (the same for every trial)"
    )
    per_subject: int | None = Field(
        None, ge=1, description="for a group task (mmlu): a seeded stratified subset of k items per subtask "
        "(subject), the same for every trial; its other tasks keep `limit`"
    )
    subset_seed: int = 0
    batch_size: int | Literal["auto"] = Field("auto", description="auto = sized from free memory")
    include_path: list[str] = Field(
        default_factory=list, description="extra folders of lm-eval task YAMLs (the shipped ones are always included)"
    )
    final: FinalStageConfig | None = Field(None, description="re-score the top trials on more items at the end")
    apply_chat_template: bool = Field(
        False, description="score with the model's chat template (data.chat_template when set), as a chat model is used"
    )
    system_instruction: str | None = Field(None, description="a system message before every prompt (lm-eval's)")
    fewshot_as_multiturn: bool | None = Field(
        None, description="few-shot examples as separate chat turns; null = on with the chat template (as lm-eval)"
    )

    @model_validator(mode="after")
    def _multiturn_needs_the_chat_template(self) -> "EvaluationConfig":
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn needs the chat template: set apply_chat_template: true")
        return self


class AshaConfig(Strict):
    enabled: bool = True
    grace_steps: int = Field(10, ge=1)
    reduction_factor: float = Field(2, gt=1)
    min_trials_per_rung: int = Field(
        3, ge=1, description="the first N trials to reach each rung always continue (1 = Ray's plain ASHA)"
    )


class Tradeoff(Strict):
    metric: Literal["peak_memory_mb", "train_seconds", "wall_seconds", "tokens_per_second"]
    direction: Literal["maximize", "minimize"] = "minimize"


class SearchConfig(Strict):
    space: str | None = Field("qlora", description="search space file or shipped name; null = the base trial only")
    num_trials: int = Field(8, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    sampler_seed: int = 0
    metric: str = Field("zorble/acc", description="TASK/METRIC as lm-eval reports it, or `objective` with weights")
    direction: Literal["maximize", "minimize"] = "maximize"
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="TASK/METRIC: weight; the objective is their weighted mean (negative weight = lower is better)",
    )
    tradeoffs: list[Tradeoff] = Field(
        default_factory=list, description="more objectives (e.g. peak_memory_mb) for a multi-objective search"
    )
    baselines: list[dict[str, Any]] = Field(default_factory=list, description="search-space points tried first")
    asha: AshaConfig = Field(default_factory=AshaConfig)

    @model_validator(mode="after")
    def _weights_rank_by_objective(self) -> "SearchConfig":
        if not self.weights:
            return self
        # A bare task name means its accuracy, as in `weights: {mmlu: 0.7, arc_easy: 0.3}`.
        self.__dict__["weights"] = {(k if "/" in k else f"{k}/acc"): v for k, v in self.weights.items()}
        if "metric" not in self.model_fields_set:
            self.__dict__["metric"] = "objective"
        if self.metric != "objective":
            raise ValueError("with search.weights the trials are ranked by their weighted mean: set metric: objective")
        if self.direction != "maximize":
            raise ValueError("with search.weights the objective is maximized; give lower-is-better metrics a negative weight")
        if not any(self.weights.values()):
            raise ValueError("search.weights are all zero")
        return self


class TrackingConfig(Strict):
    uri: str = Field(
        default_factory=default_tracking_uri,
        description="MLflow tracking URI; defaults to $MLFLOW_TRACKING_URI, else a sqlite file here",
    )
    experiment: str | None = Field(None, description="defaults to the sweep's name")

    @model_validator(mode="after")
    def _no_credentials_in_uri(self) -> "TrackingConfig":
        # The URI is logged and copied into configs; a password in it would leak everywhere.
        if re.match(r"^[a-z+]+://[^/@]+:[^/@]*@", self.uri):
            raise ValueError("tracking.uri holds credentials; remove them and set MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD (or your database's own variables) in the environment")
        return self


class ClusterConfig(Strict):
    address: str | None = Field(None, description="Ray cluster: auto, ray://HOST:PORT; null = a local Ray")


class ResourcesConfig(Strict):
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float | Literal["auto"] = Field(
        "auto", description="auto = each trial's share from its memory estimate; else a fixed share of one GPU, 0 to 1"
    )

    @field_validator("gpus_per_trial")
    @classmethod
    def _at_most_one_gpu(cls, value: float | str) -> float | str:
        # A trial is one process training on one card: given two, a 4-bit model still lands on the
        # first card (device_map) and the Trainer doubles its batch there, so a second GPU packs nothing.
        if value != "auto" and not 0 <= value <= 1:
            raise ValueError(f"is {value:g}, but a trial runs on one GPU: use auto (a share sized from each trial's "
                             "memory estimate) or a fixed share of one GPU between 0 and 1")
        return value


class TrialConfig(Strict):
    """Everything one trial needs: the unit of reproducibility."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)


class SweepConfig(TrialConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    search: SearchConfig = Field(default_factory=SearchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    output_dir: str = Field("runs", description="adapters and Ray Tune state go to OUTPUT_DIR/NAME (relative to the working directory)")

    # Where the file was read from: relative paths in the file are relative to it.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _experiment_defaults_to_name(self) -> "SweepConfig":
        if self.tracking.experiment is None:
            self.tracking.experiment = self.name
        return self

    def trial(self) -> TrialConfig:
        return TrialConfig(**self.model_dump(include=set(TrialConfig.model_fields)))

    def resolve_path(self, value: str) -> Path:
        return resolve_path(value, self.base_dir)


ConfigT = TypeVar("ConfigT", bound=BaseModel)


class SweepFileError(Exception):
    """A problem the user can fix in the sweep file; every problem found, each on its own line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


# pydantic puts the tried type of a union field into the error location (`gpus_per_trial.float`).
UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|function-after|literal)(\[.*\])?$")


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not (isinstance(part, str) and UNION_TAG.match(part)))


def describe_validation_error(error: ValidationError) -> list[str]:
    """One problem per field: the alternatives of a union field are merged into one message."""
    by_field: dict[str, list[str]] = {}
    for item in error.errors():
        where = _field_path(item["loc"])
        if item["type"] == "extra_forbidden":
            text = "unknown key; remove it or check its spelling"
        elif item["type"] == "missing":
            text = "required; add it"
        elif item["type"] == "value_error":
            text = item["msg"].removeprefix("Value error, ")
        else:
            text = f"{item['msg']} (got {item.get('input')!r})"
        if text not in by_field.setdefault(where, []):
            by_field[where].append(text)
    return [f"{where}: {' or '.join(texts)}" if where else " or ".join(texts) for where, texts in by_field.items()]


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SweepFileError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SweepFileError(str(path), [f"{where}invalid YAML: {getattr(exc, 'problem', exc)}"]) from None


def load_config(path: str | Path, model: type[ConfigT]) -> ConfigT:
    """A sweep-like YAML file as `model`; relative paths in it are relative to the file."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SweepFileError(str(path), ["the file must be a mapping of keys (name, model, data, ...)"])
    try:
        return model(**raw, base_dir=path.resolve().parent)
    except ValidationError as exc:
        raise SweepFileError(str(path), describe_validation_error(exc)) from None


def load_sweep(path: str | Path) -> SweepConfig:
    return load_config(path, SweepConfig)


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
