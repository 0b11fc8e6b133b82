"""The final stage scores every finalist of one quantization on one loaded base (peft's load_adapter /
set_adapter), exactly as each adapter scores alone on a fresh base, and the untuned base's final-stage
guard on that same load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qsweep.config.schema import FinalStageConfig, SweepConfig
from qsweep.evaluate import cache as evaluation_cache
from qsweep.train.provenance import CONFIG_FILE, read_trial_config

STAGE = {"top_k": 2, "limit": 6}


@pytest.fixture
def two_trials(tiny_sweep_dict: dict, tmp_path: Path, unquantized_cache: Path) -> tuple[SweepConfig, list[Path]]:
    """Two tiny trials of one quantization, trained apart (different rank, seed and a large learning
    rate, so their adapters visibly differ), each with its config.yaml and adapter as a sweep leaves them."""
    from qsweep.train.trial import run_trial

    tiny_sweep_dict["training"].update({"max_steps": 2, "eval_every": 2, "learning_rate": 0.05})
    sweep = SweepConfig(**tiny_sweep_dict)
    folders = []
    for i, (r, seed) in enumerate(((4, 1), (8, 2))):
        trial = sweep.trial()
        trial.lora.r, trial.training.seed = r, seed
        folders.append(tmp_path / f"trial{i}")
        run_trial(trial, sweep.base_dir, folders[-1], report=lambda _: None)
    return sweep, folders


def fresh_scores(folder: Path) -> tuple[dict[str, float], torch.Tensor]:
    """What scoring one adapter alone gives, written with peft's own API: a fresh 4-bit base, kbit
    preparation as in training, PeftModel.from_pretrained; and its logits on fixed tokens."""
    from peft import PeftModel, prepare_model_for_kbit_training

    from qsweep.evaluate.harness import score
    from qsweep.train.models import resolve_model
    from qsweep.train.trial import load_base

    trial, provenance = read_trial_config(folder / CONFIG_FILE)
    base, tokenizer = load_base(resolve_model(trial.model.name).path, trial.quantization)
    model = PeftModel.from_pretrained(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False),
                                      folder / "adapter")
    model.eval()
    result = score(model, tokenizer, trial.evaluation, Path(provenance["base_dir"]), trial.quantization,
                   stage=FinalStageConfig(**STAGE))
    return result.scores, logits(model)


def logits(model) -> torch.Tensor:
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=tokens).logits


def counting_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of the real load_base, recorded and passed through."""
    import qsweep.train.trial

    real, calls = qsweep.train.trial.load_base, []

    def spy(path, quant, *args, **kwargs):
        calls.append(quant.quant_type)
        return real(path, quant, *args, **kwargs)

    monkeypatch.setattr(qsweep.train.trial, "load_base", spy)
    return calls


def test_finalists_of_one_quantization_score_on_one_base_as_each_would_alone(two_trials, tmp_path, monkeypatch):
    from qsweep.orchestrate.final import score_final

    _, folders = two_trials
    alone = [fresh_scores(folder) for folder in folders]
    # Not vacuous: the two adapters really differ, so a base that kept the first adapter active would show.
    assert not torch.equal(alone[0][1], alone[1][1])

    loads = counting_loads(monkeypatch)
    outcome = score_final([str(f) for f in folders], STAGE, None, 1, str(tmp_path / "final_stage_0.log"))
    assert loads == ["nf4"]
    for folder, (scores, _) in zip(folders, alone):
        assert outcome["scores"][str(folder)]["scores"] == scores
        assert len(outcome["scores"][str(folder)]["items"]["zorble"]) == STAGE["limit"]
    assert (tmp_path / "final_stage_0.log").read_text().count("loaded the 4-bit base") == 1


def test_each_adapter_on_the_shared_base_gives_its_own_logits(two_trials):
    from qsweep.report.replay import load_trained_on_one_base

    sweep, folders = two_trials
    logged = {f"trial_{i}": (read_trial_config(f / CONFIG_FILE)[0], f / "adapter") for i, f in enumerate(folders)}
    _, adapters = load_trained_on_one_base(logged, sweep.base_dir)
    shared = [logits(model) for _, model in adapters]
    for folder, got in zip(folders, shared):
        assert torch.equal(got, fresh_scores(folder)[1])


def test_the_untuned_base_is_scored_on_the_same_load_and_cached(two_trials, tmp_path, monkeypatch):
    """The final stage's own tasks on the untuned base: scored on the finalists' base before any adapter
    touches it, equal to scoring a freshly loaded base, and cached under its key."""
    from qsweep.orchestrate.final import final_baseline_trial, score_final
    from qsweep.orchestrate.stages import baseline_key
    from qsweep.train.trial import UntunedBase, score_untuned_base

    sweep, folders = two_trials
    sweep.evaluation.final = FinalStageConfig(top_k=2, tasks=["zorble"], limit=5)
    trial = final_baseline_trial(sweep, "nf4")
    key, ingredients = baseline_key(trial, sweep.base_dir)
    request = {"config": trial.model_dump(mode="json"), "key": key, "ingredients": ingredients}

    loads = counting_loads(monkeypatch)
    outcome = score_final([str(f) for f in folders], {"top_k": 2, "limit": 5}, request, 1, str(tmp_path / "f.log"))
    assert loads == ["nf4"]
    assert evaluation_cache.load(key)["scores"] == outcome["baseline"]["scores"]
    assert len(outcome["baseline"]["items"]["zorble"]) == 5

    evaluation_cache.entry_path(key).unlink()
    alone = score_untuned_base(UntunedBase(trial, key, ingredients), sweep.base_dir)
    assert loads == ["nf4", "nf4"]
    assert alone["scores"] == outcome["baseline"]["scores"]


def test_a_finalists_guard_goes_into_its_model_card_and_registry_tags(tiny_sweep_dict):
    from qsweep.report.publish import model_card, scores_of
    from qsweep.report.replay import LoggedTrial

    tiny_sweep_dict["evaluation"]["final"] = {"top_k": 2, "tasks": ["mmlu_offline"], "per_subject": 1}
    trial = SweepConfig(**tiny_sweep_dict).trial()
    metrics = {"zorble/acc": 0.5, "final/zorble/acc": 0.55, "final/mmlu_offline/acc": 0.246,
               "delta/final/mmlu_offline/acc": 0.01, "train_seconds": 40.0}
    logged = LoggedTrial("r1", trial, {}, Path("adapter"), metrics)
    assert scores_of(logged) == {k: metrics[k] for k in ("zorble/acc", "final/zorble/acc", "final/mmlu_offline/acc")}
    assert "| final/mmlu_offline/acc | 0.2460 |" in model_card(logged)
