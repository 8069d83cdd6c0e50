"""What the run cost: tokens trained, wall time per stage, peak memory, parameters, energy.

Energy is measured where a stage recorded it (``energy_joules``: the CPU package's RAPL counter or
the GPU's NVML counter, see hardware.energy_joules) and otherwise estimated as
``power_watts`` x the stage's wall time, the assumption stated beside the figure.
"""

from __future__ import annotations

from typing import Any

JOULES_PER_KWH = 3.6e6


def run_cost(stage_metrics: dict[str, dict], power_watts: float) -> dict[str, Any]:
    """Cost figures from the stages' metrics files (``{stage: metrics}``)."""
    stages = {}
    for stage, metrics in stage_metrics.items():
        seconds = metrics.get("wall_seconds")
        if seconds is None:
            continue
        measured = metrics.get("energy_joules")
        joules = measured if measured is not None else seconds * power_watts
        stages[stage] = {"wall_seconds": seconds, "energy_joules": round(joules, 1),
                         "energy_source": "measured" if measured is not None else "estimated"}
    train = stage_metrics.get("train-adapter", {})
    total_joules = sum(s["energy_joules"] for s in stages.values())
    trainable, total = train.get("trainable_parameters"), train.get("total_parameters")
    return {
        "stages": stages,
        "wall_seconds": round(sum(s["wall_seconds"] for s in stages.values()), 1),
        "tokens_trained": train.get("tokens_seen"),
        "peak_memory_mb": train.get("peak_memory_mb"),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": None if not (trainable and total) else round(trainable / total, 5),
        "adapter_mb": train.get("output_mb"),
        "energy_kwh": round(total_joules / JOULES_PER_KWH, 6),
        "energy_assumption": (f"{power_watts:g} W x wall time for every stage without a measured counter "
                              f"({', '.join(s for s, v in stages.items() if v['energy_source'] == 'estimated') or 'none'})"),
        "hardware": train.get("hardware"),
    }
