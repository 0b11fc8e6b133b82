"""Packing trials by memory: each trial asks Ray for the share its own config needs.

A rank-8 attention-only trial and a rank-128 all-linear trial need very different memory, so a
fixed `gpu: 0.25` either crashes the big one or idles the card. Ray Tune takes a function of the
config for the request (`tune.with_resources`); this module is that function, plus the refusal of a
sweep whose smallest trial cannot fit (and of any trial too big for one card, when it starts), and
what is learned from measured trials: the calibration factor and each card's CUDA context.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from qsweep.config.paths import cache_dir, cache_root
from qsweep.config.policy import cuda_card
from qsweep.config.schema import SweepConfig, TrialConfig
from qsweep.resources.estimate import CUDA_CONTEXT_MIB, MemoryEstimate, estimate_trial_memory
from qsweep.search.space import SearchSpace, apply_params
from qsweep.train.lengths import DataLengths, data_lengths

logger = logging.getLogger(__name__)

# Headroom over the (calibrated) estimate: allocator fragmentation and what the estimate leaves out.
SAFETY_MARGIN = 1.15
CALIBRATION_FILE = "calibration.json"
# In the calibration file: the CUDA context measured per card name.
CONTEXT_KEY = "cuda_context"
# Ray rounds resource requests to 4 decimals.
RAY_PRECISION = 1e-4


class DoesNotFit(ValueError):
    pass


@dataclass(frozen=True)
class Machine:
    device: str  # "cuda" or "cpu"
    memory_mb: float  # one card's memory on CUDA, the machine's RAM on a CPU
    card: str | None = None  # the CUDA card's name, when known
    # One CUDA process's context on that card: measured there once known (cuda_context), else a guess.
    context_mb: float = CUDA_CONTEXT_MIB


class Card(NamedTuple):
    memory_mb: float
    name: str | None = None


def cuda_machine(card: Card) -> Machine:
    return Machine("cuda", card.memory_mb, card.name, cuda_context(card.name))


def this_machine() -> Machine:
    """The machine this process runs on: for validation and `qsweep estimate`, before any cluster.
    A sweep sizes its trials with cluster_machine() instead, once Ray is up."""
    card = visible_card()
    return cuda_machine(card) if card else Machine("cpu", _ram_mb())


def _ram_mb() -> float:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


# A GPU node may declare one card's memory in MiB as a custom resource, which trials never request:
# `ray start --num-gpus 8 --resources '{"qsweep_card_mb": 81559}'`. A node that does not is probed.
CARD_MB_RESOURCE = "qsweep_card_mb"


class UnknownCard(RuntimeError):
    pass


def machine_from_nodes(nodes: list[dict[str, Any]], probe: Callable[[str], Card | None]) -> Machine:
    """GPU trials when any node has a GPU, sized for the smallest card among the GPU nodes: Ray may
    place a trial on any of them, and a share sized for a larger card would overrun a smaller one.
    Each node's card is its declared CARD_MB_RESOURCE, else what `probe(node_id)` reads on it."""
    gpu_nodes = [n for n in nodes if n.get("Resources", {}).get("GPU", 0) > 0]
    if not gpu_nodes:
        return Machine("cpu", _ram_mb())
    cards: dict[str, Card] = {}
    for node in gpu_nodes:
        declared = node["Resources"].get(CARD_MB_RESOURCE)
        card = Card(float(declared)) if declared else probe(node["NodeID"])
        if not card:
            raise UnknownCard(
                f"Ray node {node['NodeID']} ({node.get('NodeManagerAddress', '?')}) has GPUs, but no CUDA card could be "
                f"read there; start it with --resources '{{\"{CARD_MB_RESOURCE}\": MIB}}' naming one card's memory"
            )
        cards[node["NodeID"]] = card
    sizes = {card.memory_mb for card in cards.values()}
    smallest = min(sizes)
    if len(sizes) > 1:
        logger.warning("GPU nodes have cards of %s MiB: trial shares are sized for the smallest, so larger cards "
                       "hold fewer trials than they could; run on one card type to pack each card fully", sorted(sizes))
    names = {card.name for card in cards.values() if card.memory_mb == smallest}
    return cuda_machine(Card(smallest, names.pop() if len(names) == 1 else None))


def visible_card() -> Card | None:
    """The first CUDA card this process sees, None without one (read without starting CUDA here:
    config.policy.cuda_card)."""
    card = cuda_card()
    return Card(card.memory_mb, card.name) if card else None


def _calibration_data() -> dict[str, Any]:
    path = cache_root() / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def cuda_context(card: str | None) -> float:
    """One CUDA process's context on `card` (a device name, as torch names it): the largest measured
    there (`cuda_context_mb` of earlier trials, stored by a sweep or `qsweep calibrate`), else
    CUDA_CONTEXT_MIB. For an unnamed card, the largest measured on any card if that is more."""
    measured = {name: float(entry["mb"]) for name, entry in _calibration_data().get(CONTEXT_KEY, {}).items()}
    if card is None:
        return max([CUDA_CONTEXT_MIB, *measured.values()])
    return measured.get(card, CUDA_CONTEXT_MIB)


def save_cuda_contexts(measured: dict[str, list[float]]) -> Path | None:
    """Stores the largest context measured per card (each card's list of `cuda_context_mb`), kept
    when an earlier one was larger: a process needs room for its largest context."""
    measured = {card: values for card, values in measured.items() if card and values}
    if not measured:
        return None
    path = cache_dir() / CALIBRATION_FILE
    data = _calibration_data()
    stored = data.setdefault(CONTEXT_KEY, {})
    for card, values in measured.items():
        before = stored.get(card, {"mb": 0.0, "runs": 0})
        stored[card] = {"mb": max(before["mb"], *values), "runs": before["runs"] + len(values)}
    path.write_text(json.dumps(data, indent=2))
    return path


def calibration(device: str) -> float:
    """The factor learned by `qsweep calibrate` (measured / estimated peak), 1.0 until then."""
    return float(_calibration_data().get(device, {}).get("factor", 1.0))


def budget_mb(estimate: MemoryEstimate, factor: float | None = None) -> float:
    """What one trial is given: the estimate calibrated (by `factor`, else this machine's calibration)
    with the safety margin. On CUDA the context is outside torch's allocator (and outside its
    per-process cap), so only tensors count there."""
    needed = estimate.tensors if estimate.device == "cuda" else estimate.total
    return needed * (calibration(estimate.device) if factor is None else factor) * SAFETY_MARGIN


def needed_mb(estimate: MemoryEstimate, factor: float | None = None) -> float:
    """What one trial takes of its device: its budget, plus its CUDA context on a card."""
    return budget_mb(estimate, factor) + (estimate.runtime_overhead if estimate.device == "cuda" else 0)


def resource_request(estimate: MemoryEstimate, machine: Machine, cpus: float) -> dict[str, float]:
    """A trial's Ray request. A GPU share over one card is clamped to the card, so Ray still places
    the trial, which then refuses itself (refuse_oversized) instead of waiting forever for a card."""
    if machine.device == "cuda":
        return {"cpu": cpus, "gpu": ray_share(needed_mb(estimate) / machine.memory_mb)}
    return {"cpu": cpus, "memory": math.ceil(on_cpu_ladder(budget_mb(estimate)) * 2**20)}


# Ray Tune hands a finished trial's worker process to the next trial only when both ask for exactly
# the same resources (reuse_actors). On a CPU, where that saves each trial its start-up and imports,
# a memory request is rounded up to the next rung of a ladder of quarter octaves: trials of about the
# same size (LoRA ranks 4 to 32 of one model) then ask alike, for at most 19% more than their budget
# (the quickstart's SmolLM2-135M trials ask for 1.19 or 1.41 GiB). GPU shares stay exact: packing the
# card is the point there, and a GPU trial runs for minutes.
CPU_LADDER = 2 ** (1 / 4)


def on_cpu_ladder(mb: float) -> float:
    """`mb` rounded up to the next rung of the CPU ladder (its rungs are 2^(k/4) MiB)."""
    return CPU_LADDER ** math.ceil(math.log(max(mb, 1.0), CPU_LADDER) - 1e-9)


def ray_share(share: float) -> float:
    """`share` as a Ray request that is never given less. Ray keeps shares in 1e-4 units and may
    keep one unit less than asked (Ray 2.60 reserves and assigns 0.0225 for 0.0226; 7 of 200 shares
    tried lost a unit, none lost more), so the request is one unit over the rounded-up share."""
    units = math.ceil(share / RAY_PRECISION) + 1
    return min(1.0, units * RAY_PRECISION)


def trial_estimate(trial: TrialConfig, model_path: Path, device: str,
                   lengths: DataLengths | None = None, context_mb: float = CUDA_CONTEXT_MIB) -> MemoryEstimate:
    return estimate_trial_memory(trial, model_path, device, lengths, context_mb)


def trial_lengths(trial: TrialConfig, base_dir: Path, model_path: Path) -> DataLengths:
    """The token lengths of the trial's data (profiled once per process for each data config)."""
    return data_lengths(trial.data, base_dir, model_path, trial.model.trust_remote_code)


def sized_estimate(trial: TrialConfig, base_dir: Path, model_path: Path, device: str,
                   context_mb: float = CUDA_CONTEXT_MIB) -> MemoryEstimate:
    """The trial's estimate with activations sized from its data's real token lengths."""
    return trial_estimate(trial, model_path, device, trial_lengths(trial, base_dir, model_path), context_mb)


def resources_for(sweep: SweepConfig, model_path: Path, machine: Machine) -> Callable[[dict], dict[str, float]]:
    """The function Ray calls with each trial's config to size its request. Each trial's own batch
    size, steps and max_seq_length pick its length from the data's profile (see train.lengths)."""
    base = sweep.trial()
    cpus = sweep.resources.cpus_per_trial
    fixed = sweep.resources.gpus_per_trial

    def request(config: dict[str, Any]) -> dict[str, float]:
        if machine.device == "cuda" and fixed != "auto":
            return {"cpu": cpus, "gpu": float(fixed)}
        trial = apply_params(base, config)
        return resource_request(sized_estimate(trial, sweep.base_dir, model_path, machine.device, machine.context_mb),
                                machine, cpus)

    return request


def extreme_trials(sweep: SweepConfig, space: SearchSpace | None,
                   model_path: Path | None = None) -> dict[str, TrialConfig]:
    """The baseline config, and the smallest and largest trials the space allows (each param set
    to its most, then least, memory-hungry edge value, one at a time, as memory grows monotonically
    in every searched field). `model_path` is any folder with the model's config.json; by default
    the model is resolved (built or downloaded)."""
    base = sweep.trial()
    found = {"baseline": base}
    if space is None or not space.params:
        return found | {"smallest": base, "largest": base}
    if model_path is None:
        from qsweep.train.models import resolve_model

        model_path = resolve_model(sweep.model.name, sweep.model.revision, sweep.base_dir).path
    return found | {"smallest": _greedy(sweep, space, model_path, smallest=True),
                    "largest": _greedy(sweep, space, model_path, smallest=False)}


def _greedy(sweep: SweepConfig, space: SearchSpace, path: Path, smallest: bool) -> TrialConfig:
    chosen: dict[str, Any] = {}
    for name, spec in space.params.items():
        key = space.key(name)
        options = [(sized_estimate(apply_params(sweep.trial(), {**chosen, key: v}), sweep.base_dir, path,
                                       "cpu").total, i, v) for i, v in enumerate(spec.edge_values())]
        chosen[key] = (min(options) if smallest else max(options))[2]
    return apply_params(sweep.trial(), chosen)


def check_fits(estimate: MemoryEstimate, machine: Machine, which: str = "the smallest trial of this sweep",
               factor: float | None = None) -> None:
    """Raises DoesNotFit, with the numbers and the fixes, when `which` trial cannot fit one card (or
    this machine on a CPU)."""
    needed = needed_mb(estimate, factor)
    if needed <= machine.memory_mb:
        return
    on_gpu = estimate.device == "cuda"
    parts = f"estimate {estimate.tensors if on_gpu else estimate.total:,.0f} MiB x{SAFETY_MARGIN} margin" + (
        f" + {estimate.runtime_overhead:,.0f} MiB CUDA context" if on_gpu else "") + f"; {estimate.sequence.describe()}"
    raise DoesNotFit(
        f"{which} needs {needed:,.0f} MiB ({parts}) but {'one GPU' if on_gpu else 'this machine'} has "
        f"{machine.memory_mb:,.0f} MiB; lower training.batch_size or data.max_seq_length, turn on "
        "training.gradient_checkpointing, or use a smaller model"
    )


def refuse_oversized(trial: TrialConfig, base_dir: Path, model_path: Path, machine: Machine,
                     factor: float) -> None:
    """Refuses, before anything is loaded, a trial that cannot fit one card: Ray got the whole card
    for it (resource_request), and loading it would only end in an out-of-memory error a minute
    later. `factor` is the driver's calibration, so this agrees with the request it sized."""
    estimate = sized_estimate(trial, base_dir, model_path, machine.device, machine.context_mb)
    check_fits(estimate, machine, "this trial", factor)


@dataclass(frozen=True)
class Calibration:
    factor: float  # what later estimates are multiplied by
    worst_ratio: float  # the largest measured/estimated peak seen
    reason: str


def fit_calibration(pairs: list[tuple[float, float]]) -> Calibration:
    """The factor that covers the measured peaks: the largest measured/estimated ratio seen, so a
    packed trial is never given less than the worst one needed (>= 1 run required). Never below 1:
    peaks under the estimate say the estimate is safe, not that trials may be given less than it
    (the peaks seen are of the configs tried, not of every config the next sweep may try)."""
    worst = max(measured / estimated for estimated, measured in pairs)
    if worst < 1.0:
        return Calibration(1.0, worst, f"measured peaks are at most {worst:.3f} of their estimates; kept at 1.0, "
                                       "since a factor below 1 would give trials less than their estimate")
    return Calibration(worst, worst, f"measured peaks are up to {worst:.3f} of their estimates")


def measured_peak(metrics: dict[str, float], device: str) -> float | None:
    """The peak a trial's estimate is calibrated against: on CUDA what torch reserved (what the cap
    limits: `peak_reserved_mb`, which also marks `peak_memory_mb` as reserved), on a CPU `peak_memory_mb`."""
    return metrics.get("peak_reserved_mb" if device == "cuda" else "peak_memory_mb")


def save_calibration(device: str, factor: float, runs: int) -> Path:
    path = cache_dir() / CALIBRATION_FILE
    data = _calibration_data()
    data[device] = {"factor": factor, "runs": runs}
    path.write_text(json.dumps(data, indent=2))
    return path
