"""``risk.fail_on``: conditions over the risk summary that stop the pipeline once the reports are written.

What a gate may say and mean is :mod:`qlora_pipeline.gate_syntax` (params are checked against it
when loaded); this applies the gates to a run's summary.
"""

from __future__ import annotations

from typing import Any

from qlora_pipeline.gate_syntax import Gate, parse_gate


def tripped(entries: list[str], summary: dict[str, Any]) -> list[tuple[Gate, Any]]:
    """The gates that hold on ``summary``, each with the figure's value."""
    gates = [parse_gate(entry) for entry in entries]
    return [(gate, summary.get(gate.figure)) for gate in gates if gate.holds(summary)]
