"""Where to cut a long chat thread into conversations: data.session_gap_minutes, measured on chitchat.

A chat app's export is one thread per chat; the pipeline cuts it where a pause exceeds
``data.session_gap_minutes``. chitchat (the embedded corpus) keeps its conversations apart and
timestamps every message, so a cut can be scored against real boundaries:

- **conversations cut**: the share of conversations (with 2+ timed messages) holding a pause longer
  than the gap: the cut would split one conversation in two (its next reply loses its context);
- **breaks found**: the share of breaks between two consecutive conversations of the same pair of
  people (threads rebuilt per pair, in time order; only breaks with a positive pause) longer than
  the gap: the cut would separate them. A missed break shows the end of an older conversation as
  context.

Both are printed for each gap, with the data's own pause quantiles; params.yaml's default cites them.
Run: .venv/bin/python bench/session_gap.py [--out bench/results/session_gap.json]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from qlora_pipeline.data.sources import chitchat_path

GAPS = (5, 15, 30, 60, 120, 240, 480, 1440)


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def pauses(corpus: dict) -> tuple[list[float], list[float]]:
    """Per conversation, its longest pause (minutes); and the pauses between one pair's consecutive conversations."""
    longest, spans = [], defaultdict(list)
    for conv in corpus.values():
        messages = [m for turn in conv["messages"] for m in turn if m.get("timestamp")]
        times = sorted(_time(m["timestamp"]) for m in messages)
        if len(times) < 2:
            continue
        longest.append(max((b - a).total_seconds() / 60 for a, b in zip(times, times[1:])))
        spans[frozenset(m["sender"] for m in messages)].append((times[0], times[-1]))
    breaks = []
    for pair in spans.values():
        pair.sort()
        breaks += [(b[0] - a[1]).total_seconds() / 60 for a, b in zip(pair, pair[1:])]
    return longest, [b for b in breaks if b > 0]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table as JSON")
    args = parser.parse_args()
    longest, breaks = pauses(json.loads(chitchat_path().read_text()))
    rows = [{"gap_minutes": gap,
             "conversations_cut": round(sum(p > gap for p in longest) / len(longest), 4),
             "breaks_found": round(sum(b > gap for b in breaks) / len(breaks), 4)} for gap in GAPS]
    print(f"chitchat: {len(longest)} conversations with 2+ timed messages; {len(breaks)} breaks between "
          f"one pair's consecutive conversations")
    print("longest pause per conversation, minutes: " + ", ".join(
        f"p{int(q * 100)} {quantile(longest, q):.1f}" for q in (0.5, 0.9, 0.95, 0.99)))
    print(f"{'gap (min)':>10} {'conversations cut':>18} {'breaks found':>13}")
    for row in rows:
        print(f"{row['gap_minutes']:>10} {row['conversations_cut']:>17.1%} {row['breaks_found']:>12.1%}")
    if args.out:
        args.out.write_text(json.dumps({"conversations": len(longest), "breaks": len(breaks), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
