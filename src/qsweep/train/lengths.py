"""Token lengths of a sweep's data, and the longest padded batch a trial will train on.

The trial's collator pads every batch to its longest row (DataCollatorForSeq2Seq, padding=True), so
the activation peak of a trial is set by the longest batch it reads: B rows x the longest row among
them, never max_seq_length unless a row reaches it. Over a whole trial that is the longest of all the
rows it reads, which is a property of the data, the batch size and the number of steps:

- The Trainer draws rows without replacement, a fresh permutation each epoch. A trial that reads at
  least as many rows as the set holds (max_steps x gradient_accumulation_steps x batch_size >= rows)
  reads every row, so its longest batch holds the longest row: that row's length is used.
- A shorter trial reads a uniformly random subset of N rows. If K rows are longer than a length l,
  the chance that none of them is read is C(rows - K, N) / C(rows, N) (hypergeometric). The length
  used is the smallest l at which the chance of reading a longer row is at most RISK (1 in 1,000).
  For a row that is one of B in a batch, F(l)^B is the chance its batch is no longer than l; over
  S steps the trial sees S x B rows, hence the rule over all rows read rather than a per-row
  percentile (a trial of 40 steps x 8 rows on p99 would exceed it with probability 1 - 0.99^320 =
  96%). Memory is near-linear in l, and the budget adds SAFETY_MARGIN on top, so the rare trial that
  does read a longer row still fits unless that row is much longer.
- Rows longer than max_seq_length are cut to it, so lengths are capped there and max_seq_length is
  always a safe answer.

Data sets of up to PROFILE_ROWS rows are tokenized in full, so the profile is exact. A peak is set
by the very longest rows, which a sample cannot bound: in a larger set, a seeded sample of
PROFILE_ROWS rows stands for it, and the count of longer rows is taken at its 95% upper bound
(Clopper-Pearson), so a trial that reads many rows falls back to max_seq_length unless rows that
long are common. PROFILE_ROWS = 20,000 costs what one trial's own tokenization of those rows costs,
once per sweep: ~4 s for 20-token rows, ~60 s for 800-token rows on one busy core.

Rows are tokenized with the trial's own code (train.data.tokenize_rows) without a length limit; a
trial's length is min(untruncated length, max_seq_length), which is what tokenize_rows keeps.
"""

from __future__ import annotations

import logging
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from qsweep.config.schema import DataConfig, TrainingConfig
from qsweep.train.chat import read_template
from qsweep.train.data import TRAIN_SPLIT, is_local, load_rows, local_path, read_local_rows, tokenize_rows

logger = logging.getLogger(__name__)

PROFILE_ROWS = 20_000
PROFILE_SEED = 0
# The chance, per trial, that it reads a row longer than the length its activations were sized for.
RISK = 1e-3
# How sure the bound on a sampled set's long rows is.
CONFIDENCE = 0.95


@dataclass(frozen=True)
class LengthProfile:
    """Untruncated token lengths of the profiled rows of one split, as (length, rows) ascending."""

    counts: tuple[tuple[int, int], ...]
    rows: int  # rows in the split; more than profiled when a sample stands for it

    @classmethod
    def of(cls, lengths: list[int], rows: int | None = None) -> "LengthProfile":
        return cls(tuple(sorted(Counter(lengths).items())), len(lengths) if rows is None else rows)

    @classmethod
    def of_tokenized(cls, tokenized: Any, rows: int | None = None) -> "LengthProfile":
        """The profile of a tokenized set (rows with input_ids), e.g. the trial's own; `rows` when
        they are a sample of a larger set."""
        import pyarrow.compute as pc

        return cls.of(pc.list_value_length(tokenized.with_format("arrow")["input_ids"]).to_pylist(), rows)

    @property
    def profiled(self) -> int:
        return sum(n for _, n in self.counts)

    @property
    def exact(self) -> bool:
        return self.profiled == self.rows

    def capped(self, max_length: int) -> list[tuple[int, int]]:
        """(length, rows) as a trial with this max_seq_length sees them."""
        capped: Counter[int] = Counter()
        for length, n in self.counts:
            capped[min(length, max_length)] += n
        return sorted(capped.items())

    def quantile(self, q: float, max_length: int) -> int:
        """The nearest-rank q-quantile of the profiled rows' lengths under max_length."""
        rank = max(1, math.ceil(q * self.profiled))
        seen = 0
        for length, n in self.capped(max_length):
            seen += n
            if seen >= rank:
                return length
        return min(self.counts[-1][0], max_length) if self.counts else 0

    def longest(self, max_length: int) -> int:
        return min(self.counts[-1][0], max_length) if self.counts else 0


@dataclass(frozen=True)
class DataLengths:
    """The profiles of a trial's training and validation rows; `unread` says why there are none."""

    train: LengthProfile | None
    validation: LengthProfile | None = None
    unread: str = ""


def of_sets(train: Any, validation: Any | None) -> DataLengths:
    """The exact profiles of tokenized sets: a trial's own rows."""
    return DataLengths(LengthProfile.of_tokenized(train),
                       LengthProfile.of_tokenized(validation) if validation is not None else None)


class BatchLength(BaseModel):
    """The row length of the longest padded batch the activations are sized for, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int
    basis: Literal["longest row", "expected longest", "max_seq_length"]
    batch_size: int
    rows_read: int
    max_seq_length: int
    rows: int | None = None  # rows in the training set
    profiled_rows: int | None = None
    p99: int | None = None  # of the profiled rows, under max_seq_length
    longest: int | None = None
    note: str = ""  # why max_seq_length was used, when it was

    def describe(self) -> str:
        head = f"activations sized for {self.batch_size:,} x {self.tokens:,} tokens"
        if self.basis == "max_seq_length":
            return f"{head} (max_seq_length): {self.note}"
        sample = "" if self.rows == self.profiled_rows else f" of a {self.profiled_rows:,}-row sample"
        stats = f"p99 of rows{sample} {self.p99}, longest {self.longest}"
        if self.basis == "longest row":
            why = (f"the trial reads every row ({self.rows_read:,} reads of {self.rows:,} rows), so the longest "
                   "sets the peak")
        else:
            why = (f"the longest batch expected in {self.rows_read:,} rows read of {self.rows:,} "
                   f"(a longer one has probability under {RISK:g})")
        return (f"{head}: {why} ({stats}); max_seq_length {self.max_seq_length:,} would be "
                f"{self.batch_size:,} x {self.max_seq_length:,}")


def rows_read(training: TrainingConfig, rows: int) -> int:
    """Rows a trial's training of a `rows`-row set reads: every micro-batch of every optimizer step
    (with num_epochs, as many steps as the Trainer will take)."""
    return training.total_steps(rows) * training.gradient_accumulation_steps * training.batch_size


def exceed_probability(rows: int, longer: int, read: int) -> float:
    """The chance that `read` rows drawn without replacement from `rows` include one of `longer`."""
    if longer <= 0:
        return 0.0
    if rows - longer < read:
        return 1.0
    none_read = (math.lgamma(rows - longer + 1) - math.lgamma(rows - longer - read + 1)
                 - math.lgamma(rows + 1) + math.lgamma(rows - read + 1))
    return -math.expm1(none_read)


def _longer_bound(profile: LengthProfile, longer_sampled: int) -> int:
    """Rows of the whole set longer than a length, from the profiled rows longer than it: the count
    itself when every row was profiled, its upper confidence bound when a sample was."""
    if profile.exact:
        return longer_sampled
    if longer_sampled >= profile.profiled:
        return profile.rows
    from scipy.stats import beta

    fraction = float(beta.ppf(CONFIDENCE, longer_sampled + 1, profile.profiled - longer_sampled))
    return math.ceil(fraction * profile.rows)


def training_batch_length(lengths: DataLengths | None, training: TrainingConfig, max_seq_length: int) -> BatchLength:
    """The length of the longest padded batch a trial is expected to train on (see the docstring)."""
    profile = lengths.train if lengths else None
    read = rows_read(training, profile.rows if profile else 0)
    common = dict(batch_size=training.batch_size, rows_read=read, max_seq_length=max_seq_length)
    if profile is None or not profile.counts:
        note = lengths.unread if lengths and lengths.unread else "no length profile of the data was given"
        return BatchLength(tokens=max_seq_length, basis="max_seq_length", note=note, **common)
    stats = dict(rows=profile.rows, profiled_rows=profile.profiled, p99=profile.quantile(0.99, max_seq_length),
                 longest=profile.longest(max_seq_length))
    if profile.exact and read >= profile.rows:
        return BatchLength(tokens=profile.longest(max_seq_length), basis="longest row", **stats, **common)
    capped = profile.capped(max_seq_length)
    longer = profile.profiled
    for length, n in capped:
        longer -= n
        # No row is longer than max_seq_length once cut, sample or not.
        bound = 0 if length >= max_seq_length else _longer_bound(profile, longer)
        if exceed_probability(profile.rows, bound, read) <= RISK:
            return BatchLength(tokens=length, basis="expected longest", **stats, **common)
    note = (f"a {profile.profiled:,}-row sample of {profile.rows:,} rows cannot bound the longest of "
            f"{read:,} rows read")
    return BatchLength(tokens=max_seq_length, basis="max_seq_length", note=note, **stats, **common)


def eval_batch_length(lengths: DataLengths | None, max_seq_length: int) -> int:
    """The longest validation row: each evaluation reads every validation row."""
    profile = lengths.validation if lengths else None
    if profile is None or not profile.counts or not profile.exact:
        return max_seq_length
    return profile.longest(max_seq_length)


def read_rows(source: str, base_dir: Path, split: str) -> Any:
    """The raw rows as the trial reads them. A local file is read into memory with the preflight's
    reader, so validation leaves no dataset cache behind (a csv's values stay text there, where the
    trial's `datasets` types them: only a number's rendering can differ); a dataset folder or a
    cached hub dataset is read through `datasets`, as the trial reads it."""
    if is_local(source, base_dir):
        from datasets import Dataset

        return Dataset.from_list([row for _, row in read_local_rows(local_path(source, base_dir))])
    return load_rows(source, base_dir, split)


def split_profile(rows: Any, data: DataConfig, tokenizer: Any, template: str | None = None) -> LengthProfile:
    """Every row's untruncated length, or a seeded sample's when the split holds over PROFILE_ROWS."""
    total = len(rows)
    if total > PROFILE_ROWS:
        rows = rows.select(sorted(random.Random(PROFILE_SEED).sample(range(total), PROFILE_ROWS)))
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    shown = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        tokenized = tokenize_rows(rows, tokenizer, data.prompt, data.completion, sys.maxsize, messages=data.messages,
                                  train_on=data.train_on, chat_template=template)
    finally:
        if shown:
            enable_progress_bar()
    return LengthProfile.of_tokenized(tokenized, total)


def data_lengths(data: DataConfig, base_dir: Path, model_path: Path, trust_remote_code: bool = False) -> DataLengths:
    """The length profiles of `data` under the model's tokenizer, computed once per process for each
    data config (max_seq_length aside: profiles are untruncated). Data that cannot be read gives no
    profile and the reason, and the estimate falls back to max_seq_length."""
    return _data_lengths(data.model_dump_json(exclude={"max_seq_length"}), str(Path(base_dir).resolve()),
                         str(Path(model_path).resolve()), trust_remote_code)


@lru_cache(maxsize=8)
def _data_lengths(data_json: str, base_dir: str, model_path: str, trust_remote_code: bool) -> DataLengths:
    from transformers import AutoTokenizer

    data = DataConfig.model_validate_json(data_json)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        template = read_template(data.chat_template, Path(base_dir))
        train = split_profile(read_rows(data.train, Path(base_dir), TRAIN_SPLIT), data, tokenizer, template)
        validation = (split_profile(read_rows(data.validation, Path(base_dir), data.validation_split), data,
                                    tokenizer, template) if data.validation else None)
    except Exception as exc:  # noqa: BLE001 - unreadable data only costs tightness: max_seq_length is safe
        first_line = (str(exc).splitlines() or [""])[0][:200]
        reason = f"the data could not be read here ({type(exc).__name__}: {first_line})"
        logger.info("length profile of %s: %s", data.train, reason)
        return DataLengths(None, None, reason)
    return DataLengths(train, validation)
