"""What the connected Ray cluster offers a trial: its GPU nodes and the memory of their cards.

In orchestrate because it asks the running Ray cluster; the sizing rule itself (machine_from_nodes)
is resources' and needs no Ray.
"""

from __future__ import annotations

from qsweep.resources.packing import RAY_PRECISION, Card, Machine, machine_from_nodes, visible_card

PROBE_TIMEOUT_S = 300


def cluster_machine() -> Machine:
    """What a trial of this sweep lands on, from the connected Ray cluster rather than this process's
    own device: a CPU-only head with GPU workers still runs its trials on the GPUs."""
    import ray

    here = ray.get_runtime_context().get_node_id()

    def probe(node_id: str) -> Card | None:
        # The driver's own node needs no task: its card is the one this process sees.
        return (node_id == here and visible_card()) or probe_card(node_id)

    return machine_from_nodes([n for n in ray.nodes() if n.get("Alive")], probe)


def probe_card(node_id: str) -> Card | None:
    """One card on `node_id` (its memory and name), read by a Ray task holding a sliver of one GPU there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # A fresh worker (max_calls=1) that exits after the probe: an idle one would keep its CUDA context on the card.
    task = ray.remote(num_cpus=0, num_gpus=RAY_PRECISION, max_calls=1)(visible_card).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    )
    return ray.get(task.remote(), timeout=PROBE_TIMEOUT_S)
