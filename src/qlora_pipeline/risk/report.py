"""reports/risk.md (one page a person reads) and the stage's console summary, from metrics/risk.json."""

from __future__ import annotations

from typing import Any

from qlora_pipeline.gate_syntax import GATE_FIGURES


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def pct_ci(row: dict | None) -> str:
    """``12.0% [8.1, 17.3]`` from a rate dict (rate, ci)."""
    if not row or row.get("rate") is None:
        return "n/a"
    low, high = row["ci"]
    return f"{100 * row['rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def signed_ci(value: float | None, ci: list | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.{digits}f}"
    return f"{text} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else text


def _templates():
    import jinja2

    # Markdown, not HTML: nothing to autoescape, but a '|' or a newline in a reply would break a table cell.
    env = jinja2.Environment(loader=jinja2.PackageLoader("qlora_pipeline.risk", "templates"), autoescape=False,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(pct=pct, pct_ci=pct_ci, num=num, signed_ci=signed_ci,
                       cell=lambda text: " ".join(str(text).split()).replace("|", "\\|")[:160])
    return env


def render(metrics: dict, examples: dict, params: Any, run_id: str | None) -> str:
    return _templates().get_template("risk.md.j2").render(
        m=metrics, s=metrics["summary"], examples=examples, risk=params.risk, clean=params.clean,
        run_id=run_id, glossary=GATE_FIGURES)


def console_summary(metrics: dict) -> str:
    s = metrics["summary"]
    canary = ("off" if s["canary_exposure_tuned"] is None
              else f"max exposure {s['canary_exposure_tuned']:.1f} bits, extracted {s['canary_extracted']}")
    return (f"risk: PII in test replies base {pct(s['pii_rate_base'])} tuned {pct(s['pii_rate_tuned'])}; "
            f"elicited tuned {pct(s['elicited_pii_rate_tuned'])}; memorized tuned {pct(s['memorized_rate_tuned'])}; "
            f"canaries {canary}; bias amplification max {num(s['bias_amplification_max'])}; refusals "
            f"{pct(s['refusal_rate_base'])} -> {pct(s['refusal_rate_tuned'])}; fit: {s['fit_verdict']}; "
            f"energy {s['energy_kwh']:.4f} kWh"
            + (f"; gates tripped: {', '.join(metrics['gates']['tripped'])}" if metrics["gates"]["tripped"] else ""))
