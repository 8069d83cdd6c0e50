"""What a ``risk.fail_on`` gate may say, and what it means: read by ``config`` and the risk stage alike.

A gate is ``<figure> <op> <value>``, e.g. ``pii_rate_tuned > 0.01`` or ``fit_verdict == over``. The
figures are the keys of ``summary`` in ``metrics/risk.json`` (:data:`GATE_FIGURES`); a figure the
run did not measure (canaries off) never trips its gate. The grammar sits at the bottom of the
package so that params are checked against it when loaded, before any work, without ``config``
importing the risk stage's code (``risk/gates.py`` applies the gates).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any

# Every figure a gate may name, with what it means (the report's glossary uses the same words).
GATE_FIGURES: dict[str, str] = {
    "pii_rate_base": "share of the base model's test replies containing PII of any type",
    "pii_rate_tuned": "share of the tuned model's test replies containing PII of any type",
    "elicited_pii_rate_base": "share of the base model's replies to the eliciting prompts containing PII",
    "elicited_pii_rate_tuned": "share of the tuned model's replies to the eliciting prompts containing PII",
    "placeholder_rate_tuned": "share of the tuned model's replies that say a scrubbing placeholder (<EMAIL> ...)",
    "memorized_rate_base": "share of the base model's replies repeating a training target verbatim",
    "memorized_rate_tuned": "share of the tuned model's replies repeating a training target verbatim",
    "canary_exposure_tuned": "largest exposure (bits) of an inserted canary under the tuned model",
    "canary_extracted": "inserted canaries the tuned model completes to the secret by greedy decoding",
    "bias_amplification_max": "largest rise, over the bias axes, of the sentiment gap between groups",
    "refusal_rate_base": "share of the safety prompts the base model declines",
    "refusal_rate_tuned": "share of the safety prompts the tuned model declines",
    "refusal_drop": "refusal_rate_base - refusal_rate_tuned",
    "train_val_gap": "final validation loss - final training loss (nats)",
    "fit_verdict": "under | fit | over",
    "energy_kwh": "estimated energy of the run's stages",
}
WORD_FIGURES = {"fit_verdict"}

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
        "!=": operator.ne}
_GATE_RE = re.compile(r"^\s*([a-z_0-9]+)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Gate:
    text: str
    figure: str
    op: str
    value: float | str

    def holds(self, summary: dict[str, Any]) -> bool:
        """True when the condition is met (the gate fails the stage); an unmeasured figure never holds."""
        actual = summary.get(self.figure)
        if actual is None:
            return False
        return bool(_OPS[self.op](actual, self.value))


def parse_gate(text: str) -> Gate:
    """One ``fail_on`` entry as a :class:`Gate`; ``ValueError`` says what is wrong and the form to use."""
    match = _GATE_RE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{text!r} is not '<figure> <op> <value>' (ops: {' '.join(_OPS)}), "
                         "e.g. 'pii_rate_tuned > 0.01'")
    figure, op, raw = match.groups()
    if figure not in GATE_FIGURES:
        raise ValueError(f"{text!r}: unknown figure '{figure}'; choose from {', '.join(GATE_FIGURES)}")
    if figure in WORD_FIGURES:
        if op not in ("==", "!="):
            raise ValueError(f"{text!r}: {figure} is a word; compare it with == or !=")
        if raw not in ("under", "fit", "over"):
            raise ValueError(f"{text!r}: {figure} is one of under, fit, over")
        return Gate(text, figure, op, raw)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{text!r}: '{raw}' is not a number") from None
    if not math.isfinite(value):  # a comparison with nan is never true: the gate could never fire
        raise ValueError(f"{text!r}: '{raw}' is not a finite number")
    return Gate(text, figure, op, value)
