"""LoRA target-module presets resolved against real (tiny) Llama and GPT-2 models, and used by peft."""

from __future__ import annotations

from pathlib import Path

import pytest

from qsweep.train.targets import PRESETS, TargetModuleError, linear_module_names, resolve_target_modules

LLAMA_ATTENTION = ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
LLAMA_MLP = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
GPT2_ATTENTION = ["attn.c_attn", "attn.c_proj"]
GPT2_MLP = ["mlp.c_fc", "mlp.c_proj"]


@pytest.fixture(scope="module")
def llama_names(tiny_llama: Path) -> list[str]:
    return linear_module_names(tiny_llama)


@pytest.fixture(scope="module")
def gpt2_names(tiny_gpt2: Path) -> list[str]:
    return linear_module_names(tiny_gpt2)


def matched(names: list[str], targets: list[str]) -> list[str]:
    """The full module names peft would wrap for a list of targets (its suffix rule)."""
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


# --- the linear layers of each architecture -----------------------------------------------------


def test_linear_module_names_llama(llama_names):
    assert len(llama_names) == 2 * 7
    assert "model.layers.0.self_attn.q_proj" in llama_names
    assert "model.layers.1.mlp.down_proj" in llama_names
    assert not any("lm_head" in n or "embed" in n for n in llama_names)


def test_linear_module_names_gpt2_includes_conv1d(gpt2_names):
    assert sorted(gpt2_names) == sorted(
        f"transformer.h.{i}.{leaf}" for i in range(2) for leaf in GPT2_ATTENTION + GPT2_MLP
    )
    assert not any("lm_head" in n for n in gpt2_names)


# --- presets --------------------------------------------------------------------------------------


def test_llama_presets(llama_names):
    assert resolve_target_modules("attention", llama_names) == LLAMA_ATTENTION
    assert resolve_target_modules("mlp", llama_names) == LLAMA_MLP
    assert resolve_target_modules("all-linear", llama_names) == sorted(LLAMA_ATTENTION + LLAMA_MLP)


def test_gpt2_presets(gpt2_names):
    assert resolve_target_modules("attention", gpt2_names) == GPT2_ATTENTION
    assert resolve_target_modules("mlp", gpt2_names) == GPT2_MLP
    assert resolve_target_modules("all-linear", gpt2_names) == sorted(GPT2_ATTENTION + GPT2_MLP)


def test_gpt2_c_proj_is_kept_apart_by_block(gpt2_names):
    """c_proj is in both blocks: the attention targets must not reach the MLP's c_proj, and back."""
    attention = matched(gpt2_names, resolve_target_modules("attention", gpt2_names))
    mlp = matched(gpt2_names, resolve_target_modules("mlp", gpt2_names))
    assert attention and mlp
    assert all(".attn." in n for n in attention)
    assert all(".mlp." in n for n in mlp)
    assert not set(attention) & set(mlp)
    assert sorted(attention + mlp) == sorted(gpt2_names)
    assert "transformer.h.0.attn.c_proj" in attention and "transformer.h.0.mlp.c_proj" in mlp


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_linear_is_the_union_and_never_the_head(arch, llama_names, gpt2_names):
    names = llama_names if arch == "llama" else gpt2_names
    union = set(resolve_target_modules("attention", names)) | set(resolve_target_modules("mlp", names))
    everything = resolve_target_modules("all-linear", names)
    assert set(everything) == union
    assert not any("lm_head" in t for t in everything)
    assert sorted(matched(names, everything)) == sorted(names)


def test_untied_head_is_not_a_linear_target(tiny_llama, tmp_path):
    """linear_module_names drops the output head even when it is its own Linear (untied embeddings)."""
    import json

    config = json.loads((tiny_llama / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    names = linear_module_names(tmp_path)
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    assert "lm_head" not in " ".join(resolve_target_modules("all-linear", names))


# --- explicit names -------------------------------------------------------------------------------


def test_explicit_leaf_names(llama_names, gpt2_names):
    assert resolve_target_modules(["q_proj", "v_proj"], llama_names) == ["self_attn.q_proj", "self_attn.v_proj"]
    assert resolve_target_modules(["c_attn"], gpt2_names) == ["attn.c_attn"]
    # A leaf in both blocks gives both, each qualified by its block.
    assert resolve_target_modules(["c_proj"], gpt2_names) == ["attn.c_proj", "mlp.c_proj"]


def test_explicit_qualified_names(gpt2_names):
    assert resolve_target_modules(["mlp.c_proj"], gpt2_names) == ["mlp.c_proj"]
    assert resolve_target_modules(["attn.c_proj", "mlp.c_fc"], gpt2_names) == ["attn.c_proj", "mlp.c_fc"]


def test_comma_separated_names(llama_names, gpt2_names):
    assert resolve_target_modules("q_proj,v_proj", llama_names) == ["self_attn.q_proj", "self_attn.v_proj"]
    assert resolve_target_modules(" q_proj , down_proj ", llama_names) == ["mlp.down_proj", "self_attn.q_proj"]
    assert resolve_target_modules("attn.c_attn,mlp.c_fc", gpt2_names) == ["attn.c_attn", "mlp.c_fc"]
    assert resolve_target_modules("q_proj", llama_names) == ["self_attn.q_proj"]


def test_explicit_full_module_name_targets_only_that_module(llama_names):
    targets = resolve_target_modules(["model.layers.0.self_attn.q_proj"], llama_names)
    assert matched(llama_names, targets) == ["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("spec", ["qkv_proj", ["q_proj", "nope"], "q_proj,c_fc", "self_attn"])
def test_unknown_name_lists_the_valid_names(llama_names, spec):
    with pytest.raises(TargetModuleError) as info:
        resolve_target_modules(spec, llama_names)
    message = str(info.value)
    assert "not in this model" in message
    for preset in PRESETS:
        assert preset in message
    for valid in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "self_attn.q_proj"]:
        assert valid in message
    assert "lm_head" not in message


def test_unknown_name_on_gpt2_names_only_what_is_unknown(gpt2_names):
    with pytest.raises(TargetModuleError) as info:
        resolve_target_modules("c_attn,q_proj", gpt2_names)
    head, _, valid = str(info.value).partition("one of:")
    assert "'q_proj'" in head and "'c_attn'" not in head
    assert {v.strip() for v in valid.split(",")} == {
        "c_attn", "c_proj", "c_fc", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj",
    }


def test_target_module_error_is_a_value_error():
    assert issubclass(TargetModuleError, ValueError)


def test_preset_that_matches_nothing_is_an_error():
    with pytest.raises(TargetModuleError, match="matches no linear layer"):
        resolve_target_modules("mlp", ["model.layers.0.self_attn.q_proj"])


# --- architectures beyond the two fixtures (config only, built on the meta device) -----------------


@pytest.fixture(scope="module")
def bert_decoder_names(tmp_path_factory) -> list[str]:
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("bert-decoder")
    BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        is_decoder=True,
    ).save_pretrained(folder)
    return linear_module_names(folder)


def test_attention_preset_is_unambiguous_on_bert_decoder(bert_decoder_names):
    attention = matched(bert_decoder_names, resolve_target_modules("attention", bert_decoder_names))
    assert attention and all(".attention." in n for n in attention), attention


def test_all_linear_never_targets_the_output_head_on_bert_decoder(bert_decoder_names):
    targets = resolve_target_modules("all-linear", bert_decoder_names)
    assert "cls.predictions.decoder" not in matched(bert_decoder_names, targets)


# --- with peft --------------------------------------------------------------------------------------


def _lora_parents(model) -> list[str]:
    return sorted(name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A"))


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("attention", [f"transformer.h.{i}.attn.{leaf}" for i in range(2) for leaf in ("c_attn", "c_proj")]),
        ("mlp", [f"transformer.h.{i}.mlp.{leaf}" for i in range(2) for leaf in ("c_fc", "c_proj")]),
    ],
)
def test_resolved_gpt2_targets_wrap_exactly_that_block_with_peft(tiny_gpt2, preset, expected):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    targets = resolve_target_modules(preset, linear_module_names(tiny_gpt2))
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, task_type="CAUSAL_LM")
    )
    parents = [p.removeprefix("base_model.model.") for p in _lora_parents(peft_model)]
    assert len(parents) == 4
    assert parents == sorted(expected)
    lora_a = [m for n, m in peft_model.named_modules() if n.endswith("lora_A.default")]
    assert len(lora_a) == 4
    # Only LoRA weights train.
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # The wrapped model still runs.
    out = peft_model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape[:2] == (1, 3)


def test_resolved_llama_all_linear_wraps_every_linear_layer_with_peft(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = linear_module_names(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=resolve_target_modules("all-linear", names), task_type="CAUSAL_LM")
    )
    parents = [p.removeprefix("base_model.model.") for p in _lora_parents(peft_model)]
    assert parents == sorted(names)
    assert not any("lm_head" in p for p in parents)
