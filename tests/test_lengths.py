"""The data's token lengths (train.lengths): the profile against the tokenizer itself and against the
trial's own tokenized rows, and the longest-batch rule against scipy and the Trainer's sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsweep.config.schema import DataConfig, TrainingConfig
from qsweep.train.lengths import (
    RISK,
    DataLengths,
    LengthProfile,
    data_lengths,
    exceed_probability,
    training_batch_length,
)

MIXED_WORDS = "a long context of words that the tokenizer has to spend many tokens on".split()


def _write_mixed(path: Path, count: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = [{"context": " ".join(rng.choices(MIXED_WORDS, k=rng.choice([0, 0, 0, rng.randint(5, 30)]))),
             "question": f"What is the zorble of {i}?", "answer": str(3 * i + 2)} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _data(train: Path, **fields) -> DataConfig:
    return DataConfig(train=str(train), prompt="{context}\nQ: {question}\nA:", completion=" {answer}",
                      max_seq_length=fields.pop("max_seq_length", 512), **fields)


def _oracle_lengths(rows: list[dict], tokenizer, data: DataConfig) -> list[int]:
    """What a row costs, tokenized here piece by piece: prompt, completion, end of text."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return [count(data.prompt.format(**row)) + count(data.completion.format(**row)) + 1 for row in rows]


def test_profile_counts_what_the_tokenizer_counts(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    rows = _write_mixed(tmp_path / "train.jsonl", 60)
    data = _data(tmp_path / "train.jsonl")
    profile = data_lengths(data, tmp_path, tiny_llama).train
    expected = _oracle_lengths(rows, AutoTokenizer.from_pretrained(tiny_llama), data)
    assert profile.exact and profile.rows == 60
    assert profile.counts == LengthProfile.of(expected).counts
    assert max(expected) > 3 * min(expected)  # long and short rows both there


def test_capped_profile_is_what_the_trial_tokenizes(tmp_path, tiny_llama):
    """Cut at a max_seq_length most long rows exceed, the profile holds the lengths the trial's own
    tokenization keeps (train.data.tokenized_sets, as run_trial calls it)."""
    from transformers import AutoTokenizer

    from qsweep.train.data import tokenized_sets

    _write_mixed(tmp_path / "train.jsonl", 60)
    data = _data(tmp_path / "train.jsonl", max_seq_length=40)
    profile = data_lengths(data, tmp_path, tiny_llama).train
    train_set, _ = tokenized_sets(data, tmp_path, AutoTokenizer.from_pretrained(tiny_llama))
    trial_lengths = sorted(len(ids) for ids in train_set["input_ids"])
    assert LengthProfile.of(trial_lengths).counts == tuple(profile.capped(40))
    assert trial_lengths[-1] == 40 and profile.longest(10_000) > 40


def test_a_large_set_is_sampled_with_a_seed_and_a_long_trial_falls_back(tmp_path, tiny_llama, monkeypatch):
    from qsweep.train import lengths

    _write_mixed(tmp_path / "train.jsonl", 300)
    data = _data(tmp_path / "train.jsonl")
    full = data_lengths(data, tmp_path, tiny_llama).train
    monkeypatch.setattr(lengths, "PROFILE_ROWS", 100)
    lengths._data_lengths.cache_clear()
    sampled = data_lengths(data, tmp_path, tiny_llama).train
    lengths._data_lengths.cache_clear()
    assert data_lengths(data, tmp_path, tiny_llama).train == sampled  # seeded
    assert sampled.rows == 300 and sampled.profiled == 100 and not sampled.exact
    whole = dict(full.counts)
    assert all(n <= whole.get(length, 0) for length, n in sampled.counts)  # a subset of the real rows
    # A trial reading 80 of the 300 rows: a 100-row sample cannot bound their longest.
    batch = training_batch_length(DataLengths(sampled), TrainingConfig(max_steps=10, batch_size=8), 512)
    assert batch.basis == "max_seq_length" and batch.tokens == 512 and "sample" in batch.note
    exact = training_batch_length(DataLengths(full), TrainingConfig(max_steps=10, batch_size=8), 512)
    assert exact.tokens == full.longest(512) < 512


def test_unreadable_data_falls_back_to_max_seq_length_and_says_why(tmp_path, tiny_llama):
    data = DataConfig(train="no-such-org/no-such-dataset", max_seq_length=128)
    found = data_lengths(data, tmp_path, tiny_llama)
    assert found.train is None and "could not be read" in found.unread
    batch = training_batch_length(found, TrainingConfig(), 128)
    assert batch.tokens == 128 and batch.basis == "max_seq_length" and batch.note == found.unread


# ---------------------------------------------------------------------------------------------
# The rule: the smallest length a longer row exceeds with probability at most RISK.

# 20,000 rows: most short, a tail of a few long ones, so a trial reading few rows may skip the tail.
TAIL = [(20, 19_000), (40, 900), (80, 90), (150, 6), (160, 3), (300, 1)]


@pytest.mark.parametrize("rows,longer,read", [(1000, 10, 50), (20_000, 100, 320), (93, 1, 92), (500, 0, 8)])
def test_exceed_probability_is_the_hypergeometric_one(rows, longer, read):
    from scipy.stats import hypergeom

    assert exceed_probability(rows, longer, read) == pytest.approx(1 - hypergeom(rows, longer, read).pmf(0), abs=1e-9)


@pytest.mark.parametrize("steps,batch", [(1, 1), (1, 8), (2, 8), (40, 8)])
def test_chosen_length_is_the_smallest_one_within_the_risk(steps, batch):
    from scipy.stats import hypergeom

    profile = LengthProfile(tuple(TAIL), sum(n for _, n in TAIL))
    chosen = training_batch_length(DataLengths(profile), TrainingConfig(max_steps=steps, batch_size=batch), 512)
    read = steps * batch

    def risk(length: int) -> float:
        longer = sum(n for value, n in TAIL if value > length)
        return 1 - hypergeom(profile.rows, longer, read).pmf(0)

    assert risk(chosen.tokens) <= RISK
    shorter = [value for value, _ in TAIL if value < chosen.tokens]
    assert not shorter or risk(max(shorter)) > RISK
    assert chosen.basis == "expected longest" and chosen.rows_read == read


def test_rule_against_the_trainers_sampler(monkeypatch):
    """Batches drawn the way the Trainer draws them (a seeded RandomSampler in batches): how often a
    trial reads a row longer than the chosen length, and longer than the next shorter one. At a risk
    of 5% (the rule's own is too rare to count in seconds) on 2,000 rows, 8 of them read."""
    import torch
    from torch.utils.data import BatchSampler, RandomSampler

    from qsweep.train import lengths as module

    monkeypatch.setattr(module, "RISK", 0.05)
    tail = [(20, 1900), (40, 80), (80, 12), (150, 5), (300, 3)]
    lengths = [length for length, n in tail for _ in range(n)]
    profile = LengthProfile.of(lengths)
    steps, batch = 2, 4
    chosen = training_batch_length(DataLengths(profile), TrainingConfig(max_steps=steps, batch_size=batch), 512)
    assert chosen.basis == "expected longest" and chosen.tokens < profile.longest(512)
    shorter = max(v for v, _ in tail if v < chosen.tokens)
    values = torch.tensor(lengths)
    trials, over = 4000, {chosen.tokens: 0, shorter: 0}
    for seed in range(trials):
        sampler = BatchSampler(RandomSampler(lengths, generator=torch.Generator().manual_seed(seed)), batch, False)
        longest = int(values[[i for _, indices in zip(range(steps), sampler) for i in indices]].max())
        for length in over:
            over[length] += longest > length
    for length, count in over.items():
        expected = exceed_probability(profile.rows, sum(n for v, n in tail if v > length), steps * batch)
        sigma = (expected * (1 - expected) / trials) ** 0.5
        assert abs(count / trials - expected) < 4 * sigma, (length, count / trials, expected)
    assert over[chosen.tokens] / trials <= 0.05 < over[shorter] / trials


def test_a_trial_reading_every_row_is_sized_for_the_longest():
    profile = LengthProfile.of([12] * 90 + [31, 64, 20])
    batch = training_batch_length(DataLengths(profile), TrainingConfig(max_steps=12, batch_size=8), 48)
    assert (batch.tokens, batch.basis) == (48, "longest row")  # cut at max_seq_length
    text = batch.describe()
    assert "8 x 48" in text and "every row" in text and "max_seq_length 48" in text
    # Gradient accumulation reads more micro-batches per step.
    few = TrainingConfig(max_steps=1, batch_size=8)
    assert training_batch_length(DataLengths(profile), few, 48).rows_read == 8
    assert training_batch_length(DataLengths(profile), few.model_copy(update={"gradient_accumulation_steps": 12}),
                                 48).basis == "longest row"
