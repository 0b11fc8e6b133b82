"""A conversational sweep end to end: `qsweep validate` and `qsweep preview` on it, lm-eval scoring
with the chat template (the prompt lm-eval builds holds the template's own rendering), the
evaluation cache keyed by how prompts are written, and (slow) a real sweep that trains on it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from chat_tokenizers import CHATML
from qsweep.cli import app

REPO = Path(__file__).resolve().parent.parent
CHAT_DATA = REPO / "tests" / "bad_sweeps" / "data" / "chat.jsonl"
SYSTEM = "Be brief."


@pytest.fixture
def chat_sweep(tiny_sweep_dict: dict, tmp_path: Path) -> dict:
    """The tiny sweep on conversations: tiny-llama has no chat template, so the sweep gives one."""
    (tmp_path / "chatml.jinja").write_text(CHATML)
    tiny_sweep_dict["data"] = {"train": str(CHAT_DATA), "validation": str(CHAT_DATA),
                               "chat_template": "chatml.jinja", "max_seq_length": 256}
    return tiny_sweep_dict


def write(sweep: dict, folder: Path) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def conversations() -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in CHAT_DATA.read_text().splitlines()]


@pytest.fixture
def tiny_tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def test_a_conversational_sweep_validates(chat_sweep: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["validate", str(write(chat_sweep, tmp_path))])
    assert result.exit_code == 0, result.output


def test_rows_that_are_not_conversations_like_the_first_are_reported(chat_sweep: dict, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    good = CHAT_DATA.read_text().splitlines()[0]
    tool_call = {"messages": [{"role": "user", "content": "Weather?"},
                              {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "w"}}]},
                              {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
    lines = [good, json.dumps({"messages": "just text"}), json.dumps({"messages": [{"role": "user"}]}),
             json.dumps(tool_call)]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    chat_sweep["data"]["train"] = "mixed.jsonl"
    result = CliRunner().invoke(app, ["validate", str(write(chat_sweep, tmp_path))])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert ("data.train: line 2 (its 'messages' is not a list of {role, content} messages), line 3 (message(s) 1 "
            "of its 'messages' lack a text role or content) of") in output
    assert "line 4" not in output, "an assistant message that calls a tool needs no content"


def test_preview_json_is_one_row_a_line_as_the_model_sees_it(chat_sweep: dict, tmp_path: Path, tiny_tokenizer,
                                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["preview", str(write(chat_sweep, tmp_path)), "--rows", "2", "--format", "json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    for line, messages in zip(lines, conversations()):
        row = json.loads(line)
        assert set(row) == {"input_ids", "labels"}
        oracle = tiny_tokenizer.apply_chat_template(messages, chat_template=CHATML, tokenize=True)["input_ids"]
        assert row["input_ids"] == list(oracle)
        trained = tiny_tokenizer.decode([t for t in row["labels"] if t != -100])
        assert trained == "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
    assert "tokens before truncation" in result.stderr


def test_preview_text_marks_the_trained_tokens_and_counts_the_cut_rows(chat_sweep: dict, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    chat_sweep["data"]["max_seq_length"] = 40
    result = CliRunner().invoke(app, ["preview", str(write(chat_sweep, tmp_path)), "--rows", "1"])
    assert result.exit_code == 0, result.output
    first = conversations()[0]
    assert f"<|im_start|>assistant\n[[{first[2]['content']}<|im_end|>\n]]" in result.stdout
    assert "\x1b[" not in result.stdout, "no colour codes when stdout is not a terminal"
    assert "8 training rows" in result.stdout and "8 (100.0%) longer than data.max_seq_length (40) and cut" in result.stdout


def test_preview_colours_the_trained_tokens_in_a_terminal(tiny_tokenizer):
    from rich.console import Console

    from qsweep.report.preview import Preview, Row, as_text, segments

    ids = tiny_tokenizer("Q: 3? A: 11", add_special_tokens=False)["input_ids"]
    labels = [-100] * (len(ids) - 2) + ids[-2:]
    preview = Preview([Row(1, ids, labels, len(ids), segments(tiny_tokenizer, ids, labels))], [len(ids)], 64)
    console = Console(force_terminal=True, color_system="standard", width=120)
    with console.capture() as captured:
        console.print(as_text(preview, colour=True))
    assert "\x1b[1;32m" in captured.get() and "[[" not in captured.get()


@pytest.mark.parametrize("change, expected", [
    ({"train": "no_such.jsonl"}, "data.train: file"),
    ({"chat_template": None}, "has no chat template"),
    ({"chat_template": str(REPO / "tests" / "bad_sweeps" / "data" / "reasoning.jinja")}, "row 1: the chat template"),
])
def test_preview_refuses_what_it_cannot_show_with_exit_2(chat_sweep: dict, tmp_path: Path, change: dict,
                                                         expected: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    chat_sweep["data"].update(change)
    result = CliRunner().invoke(app, ["preview", str(write(chat_sweep, tmp_path))])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()) and "Traceback" not in result.output
    assert result.stdout == ""


def test_lm_eval_writes_each_prompt_with_the_chat_template(tiny_llama: Path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from qsweep.evaluate.harness import evaluate_model, include_dirs

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tiny_tokenizer.chat_template = CHATML
    dirs = include_dirs([], REPO)
    chat = evaluate_model(model, tiny_tokenizer, ["zorble"], dirs, limit=2, batch_size=2, apply_chat_template=True,
                          system_instruction=SYSTEM)
    plain = evaluate_model(model, tiny_tokenizer, ["zorble"], dirs, limit=2, batch_size=2)
    for sample in chat.raw["samples"]["zorble"]:
        question = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Q: {sample['doc']['question']}\nA:"}]
        rendered = tiny_tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
        assert {context for context, _ in sample["arguments"]} == {rendered}
    for sample in plain.raw["samples"]["zorble"]:
        assert {context for context, _ in sample["arguments"]} == {f"Q: {sample['doc']['question']}\nA:"}
    assert chat.raw["chat_template_sha"] == hashlib.sha256(CHATML.encode()).hexdigest()
    assert chat.raw["system_instruction"] == SYSTEM and chat.raw["fewshot_as_multiturn"] is True
    assert plain.raw["chat_template"] is None


def test_how_prompts_are_written_is_part_of_the_evaluation_cache_key(chat_sweep: dict, tmp_path: Path):
    from qsweep.config.schema import SweepConfig
    from qsweep.orchestrate.stages import baseline_key

    def key(evaluation: dict, template: str = CHATML) -> tuple[str, dict]:
        (tmp_path / "chatml.jinja").write_text(template)
        sweep = SweepConfig(**{**chat_sweep, "evaluation": {"tasks": ["zorble"], "limit": 8, **evaluation}})
        return baseline_key(sweep.trial(), tmp_path)

    plain, ingredients = key({})
    assert "chat" not in ingredients, "plain prompts keep the key they had before chat scoring"
    chat = key({"apply_chat_template": True})
    assert len({plain, chat[0], key({"apply_chat_template": True}, CHATML + " ")[0],
                key({"apply_chat_template": True, "system_instruction": SYSTEM})[0],
                key({"apply_chat_template": True, "fewshot_as_multiturn": False})[0],
                key({"system_instruction": SYSTEM})[0]}) == 6
    assert chat[1]["chat"]["template_sha256"] == hashlib.sha256(CHATML.encode()).hexdigest()
    assert key({"apply_chat_template": True}) == chat


@pytest.mark.parametrize("evaluation", [
    {"apply_chat_template": True, "system_instruction": "Be brief, it's late."},
    {"apply_chat_template": True, "fewshot_as_multiturn": False},
    {},
])
def test_the_exported_cards_lm_eval_command_scores_as_the_trial_was(evaluation: dict, monkeypatch):
    import shlex
    import sys

    from lm_eval._cli import HarnessCLI

    from qsweep.config.schema import EvaluationConfig
    from qsweep.report.publish import chat_flags

    config = EvaluationConfig(**evaluation)
    command = f"lm_eval --model hf --tasks zorble{chat_flags(config)}"
    monkeypatch.setattr(sys, "argv", shlex.split(command))
    args = HarnessCLI().parse_args()
    assert bool(getattr(args, "apply_chat_template", False)) == config.apply_chat_template
    assert getattr(args, "system_instruction", None) == config.system_instruction
    assert getattr(args, "fewshot_as_multiturn", None) == config.fewshot_as_multiturn  # unset: lm-eval's default


@pytest.mark.slow
def test_a_conversational_sweep_trains_and_scores_with_the_chat_template(chat_sweep: dict, tmp_path: Path,
                                                                         sweep_bench, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chat_sweep["name"] = "chat-e2e"
    chat_sweep["search"]["num_trials"] = 1
    chat_sweep["evaluation"].update({"apply_chat_template": True, "system_instruction": SYSTEM})
    path = sweep_bench.write(tmp_path, chat_sweep)
    result = sweep_bench.invoke("run", path)
    assert result.exit_code == 0, result.output
    (run,) = sweep_bench.runs(f"sqlite:///{tmp_path}/mlflow.db", "chat-e2e")
    params = run.data.params
    assert params["evaluation.apply_chat_template"] == "True" and params["evaluation.system_instruction"] == SYSTEM
    assert params["data.chat_template"] == "chatml.jinja"
    results = json.loads(next((tmp_path / "runs").rglob("lm_eval_results.json")).read_text())
    assert results["chat_template_sha"] == hashlib.sha256(CHATML.encode()).hexdigest()
    samples = [json.loads(line) for line in next((tmp_path / "runs").rglob("lm_eval_samples.jsonl")).open()]
    assert samples and "zorble/acc" in run.data.metrics
    saved = json.loads(next((tmp_path / "runs").rglob("adapter/tokenizer_config.json")).read_text())
    adapter = next((tmp_path / "runs").rglob("adapter"))
    template = (adapter / "chat_template.jinja").read_text() if (adapter / "chat_template.jinja").exists() \
        else saved["chat_template"]
    assert template == CHATML, "the saved adapter's tokenizer carries the template it was trained with"
