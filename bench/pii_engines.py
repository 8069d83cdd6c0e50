"""PII engines compared: regex against presidio, on a hand-labelled set and on the chitchat corpus.

Prints and writes (``--out`` JSON, and Markdown beside it):
- per-type and overall precision/recall of each engine on ``bench/pii/labelled.jsonl``;
- for presidio, the same at several score thresholds (how ``pii_presidio.MIN_SCORE`` was chosen);
- how many chitchat messages each engine changes, per type, on a seeded sample;
- messages per second, and presidio one message at a time against batches.

The labelled set (one JSON object a line: ``text``, ``spans`` with ``start``/``end``/``type``,
``tags``) was written by hand. What counts as personal data there:
- ``name``: a private person's name, first, last or full, in any case ("tell mike i said hi").
  Public figures and fictional characters ("Taylor Swift", "Harry Potter") are *not* labelled:
  a chat model learning them leaks no one's data, and chitchat talks about them all the time.
  A scrubber that removes them is counted wrong.
- ``location``: a named place used as a place (city, region, country, lake); a place name used
  as a word ("china shop", "turkey for dinner", "new Jordans", a dog called Paris) is not.
- ``address``: a street address (number, street, suffix, unit) or a named street someone lives
  or meets on; a ZIP code counts too (no engine finds it). Fictional ones (221B Baker Street,
  sesame street) are not labelled.
- the regex types as ``data/pii.py`` defines them. Placeholders already in the text are no PII.

Matching rule (span level, per type): a predicted span is a true positive when it overlaps an
as yet unmatched gold span of the same type by at least one character (greedy, in text order,
one to one). Unmatched predictions are false positives, unmatched gold spans false negatives.
Overall figures are micro-averaged over every type; ``exact`` counts the true positives whose
boundaries are also identical. The set is small and written by the same hand that tuned the
address pattern, so treat the figures as a guide with error bars of several points.

Run (a minute on a 2-core CPU; spaCy's model loads in ~5 s):
    .venv/bin/python bench/pii_engines.py --out bench/results/<machine>/pii_engines.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qlora_pipeline.config import load_params  # noqa: E402
from qlora_pipeline.data.cleaning import normalize_text  # noqa: E402
from qlora_pipeline.data.pii import ALL_PII_TYPES, PII_TYPES, PRESIDIO_TYPES, find_pii, placeholder_spans, scrub_many  # noqa: E402
from qlora_pipeline.data.sources import chitchat_conversation, chitchat_path  # noqa: E402

ENGINE_TYPES = {"regex": PII_TYPES, "presidio": ALL_PII_TYPES}
THRESHOLDS = (0.25, 0.35, 0.5, 0.6, 0.7, 0.9)
# Messages per conversation in chitchat (258,145 / 7,168): the clean stage's batch size.
CONVERSATION_BATCH = 36

Hit = tuple[int, int, str]


# --- scoring ---------------------------------------------------------------------------------


def load_labelled(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        for span in row["spans"]:
            assert row["text"][span["start"]:span["end"]] == span["text"], (row["id"], span)
    return rows


def match(gold: list[Hit], predicted: list[Hit]) -> dict[str, Counter]:
    """tp/fp/fn/exact per type for one text, by the overlap rule in the module docstring."""
    counts: dict[str, Counter] = {}
    unmatched = list(gold)
    for start, end, pii_type in predicted:
        tally = counts.setdefault(pii_type, Counter())
        partner = next((g for g in unmatched if g[2] == pii_type and g[0] < end and start < g[1]), None)
        if partner is None:
            tally["fp"] += 1
            continue
        unmatched.remove(partner)
        tally["tp"] += 1
        tally["exact"] += partner[:2] == (start, end)
    for _, _, pii_type in unmatched:
        counts.setdefault(pii_type, Counter())["fn"] += 1
    return counts


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 3) if whole else None


def summarize(tallies: dict[str, Counter]) -> dict[str, dict]:
    """Precision/recall per type and overall (micro) from tp/fp/fn tallies."""
    total = sum(tallies.values(), Counter())
    out = {}
    for name, tally in [*sorted(tallies.items()), ("overall", total)]:
        out[name] = {
            "tp": tally["tp"], "fp": tally["fp"], "fn": tally["fn"], "exact": tally["exact"],
            "precision": _ratio(tally["tp"], tally["tp"] + tally["fp"]),
            "recall": _ratio(tally["tp"], tally["tp"] + tally["fn"]),
        }
    return out


def score(rows: list[dict], predictions: list[list[Hit]]) -> tuple[dict, list[dict]]:
    """Summary over the set, and every miss and false alarm (for reading the errors)."""
    tallies: dict[str, Counter] = {}
    errors = []
    for row, predicted in zip(rows, predictions):
        gold = [(s["start"], s["end"], s["type"]) for s in row["spans"]]
        for pii_type, tally in match(gold, predicted).items():
            tallies.setdefault(pii_type, Counter()).update(tally)
        if sorted(gold) != sorted(predicted):
            errors.append({"id": row["id"], "text": row["text"],
                           "gold": [f"{row['text'][s:e]}:{t}" for s, e, t in gold],
                           "predicted": [f"{row['text'][s:e]}:{t}" for s, e, t in predicted]})
    return summarize(tallies), errors


def presidio_inputs(rows: list[dict]) -> tuple[list, list]:
    """Presidio's scored hits per row, and the spans the regex rules and placeholders claim first (as pii.py)."""
    from qlora_pipeline.data import pii_presidio

    texts = [row["text"] for row in rows]
    claimed = [[(s, e) for s, e, _ in hits] + placeholder_spans(text)
               for text, hits in zip(texts, find_pii(texts, PII_TYPES, "regex"))]
    return pii_presidio.scored_hits(texts), claimed


def threshold_sweep(rows: list[dict], scored: list, claimed: list) -> dict[str, dict]:
    """Presidio's types at one score threshold for all three, over the regex claims as in pii.py."""
    from qlora_pipeline.data import pii_presidio

    texts = [row["text"] for row in rows]
    sweep = {}
    for threshold in THRESHOLDS:
        min_score = {pii_type: threshold for pii_type in PRESIDIO_TYPES}
        predicted = [pii_presidio.claim(text, hits, spans, min_score)
                     for text, hits, spans in zip(texts, scored, claimed)]
        summary, _ = score([_only(row, PRESIDIO_TYPES) for row in rows], predicted)
        sweep[str(threshold)] = {t: summary.get(t) for t in (*PRESIDIO_TYPES, "overall")}
    return sweep


LOOK_ALIKE_TAGS = ("celebrity", "brand", "holiday", "food", "grade", "place-as-topic", "title")


def look_alikes(rows: list[dict], scored: list, claimed: list) -> dict[str, dict]:
    """Presidio's types without and with ``pii_presidio.look_alike`` (the rules for public figures, brands,
    holidays, grades and places as topics), on the same hits in the same run: precision and recall per
    type, and false positives on the look-alike rows against recall on every other row."""
    from qlora_pipeline.data import pii_presidio

    texts = [row["text"] for row in rows]
    only = [_only(row, PRESIDIO_TYPES) for row in rows]
    out = {}
    for label, on in (("without", False), ("with", True)):
        predicted = [pii_presidio.claim(text, hits, spans, look_alikes=on)
                     for text, hits, spans in zip(texts, scored, claimed)]
        summary, _ = score(only, predicted)
        alike = [i for i, row in enumerate(rows) if set(row["tags"]) & set(LOOK_ALIKE_TAGS) and not row["spans"]]
        false_alarms = sum(len(predicted[i]) for i in alike)
        real = [i for i, row in enumerate(only) if row["spans"]]
        recall, _ = score([only[i] for i in real], [predicted[i] for i in real])
        out[label] = {"by_type": {t: summary.get(t) for t in (*PRESIDIO_TYPES, "overall")},
                      "look_alike_rows": len(alike), "look_alike_rows_flagged": sum(bool(predicted[i]) for i in alike),
                      "look_alike_false_positives": false_alarms,
                      "recall_on_rows_with_pii": (recall.get("overall") or {}).get("recall")}
    return out


def _only(row: dict, types: Sequence[str]) -> dict:
    return {**row, "spans": [s for s in row["spans"] if s["type"] in types]}


# --- chitchat --------------------------------------------------------------------------------


def chitchat_messages() -> list[str]:
    data = json.loads(chitchat_path().read_text(encoding="utf-8"))
    return [m["text"] for cid, conv in data.items() for m in chitchat_conversation(cid, conv)["messages"]]


def in_batches(texts: list[str], size: int):
    for start in range(0, len(texts), size):
        yield texts[start:start + size]


def corpus_changes(texts: list[str], engine: str, examples: int, seed: int) -> dict:
    """Messages changed and hits per type, scrubbed a conversation-sized batch at a time."""
    started = time.perf_counter()
    results = [r for batch in in_batches(texts, CONVERSATION_BATCH)
               for r in scrub_many(batch, ENGINE_TYPES[engine], engine)]
    seconds = time.perf_counter() - started
    changed = [(text, out) for text, (out, _) in zip(texts, results) if out != text]
    hits = sum((counts for _, counts in results), Counter())
    picked = random.Random(seed).sample(changed, min(examples, len(changed)))
    return {
        "messages": len(texts), "changed": len(changed), "share_changed": round(len(changed) / len(texts), 4),
        "hits": dict(sorted(hits.items())), "seconds": round(seconds, 2),
        "messages_per_second": round(len(texts) / seconds, 1),
        "examples": [{"before": before, "after": after} for before, after in picked],
    }


def batching(texts: list[str]) -> dict[str, float]:
    """Presidio messages per second: one call per message, a conversation per call, 256 per call."""
    out = {}
    for label, size in (("one_at_a_time", 1), (f"batch_{CONVERSATION_BATCH}", CONVERSATION_BATCH), ("batch_256", 256)):
        started = time.perf_counter()
        for batch in in_batches(texts, size):
            scrub_many(batch, ALL_PII_TYPES, "presidio")
        out[label] = round(len(texts) / (time.perf_counter() - started), 1)
    return out


# --- report ----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def markdown(result: dict) -> str:
    lines = ["# PII engines: regex against presidio", "",
             f"Machine: {result['machine']}. Labelled set: {result['labelled']['messages']} messages, "
             f"{result['labelled']['gold_spans']} gold spans (`bench/pii/labelled.jsonl`; policy and matching "
             "rule in `bench/pii_engines.py`).", "",
             "## Labelled set: precision / recall (span overlap, same type)", "",
             "| type | regex P | regex R | presidio P | presidio R | gold |", "|---|---|---|---|---|---|"]
    regex, presidio = result["labelled"]["regex"], result["labelled"]["presidio"]
    for pii_type in [*ALL_PII_TYPES, "overall"]:
        r, p = regex.get(pii_type, {}), presidio.get(pii_type, {})
        gold = p.get("tp", 0) + p.get("fn", 0)
        if not gold and not p.get("fp") and not r.get("fp"):
            continue
        lines.append(f"| {pii_type} | {_pct(r.get('precision'))} | {_pct(r.get('recall'))} | "
                     f"{_pct(p.get('precision'))} | {_pct(p.get('recall'))} | {gold} |")
    lines += ["", "## Presidio threshold sweep (names, addresses, locations only)", "",
              "| threshold | name P/R | address P/R | location P/R | overall P/R |", "|---|---|---|---|---|"]
    for threshold, row in result["labelled"]["presidio_threshold_sweep"].items():
        cells = [f"{_pct((row[t] or {}).get('precision'))} / {_pct((row[t] or {}).get('recall'))}"
                 for t in (*PRESIDIO_TYPES, "overall")]
        lines.append(f"| {threshold} | " + " | ".join(cells) + " |")
    alike = result["labelled"]["presidio_look_alikes"]
    lines += ["", "## Presidio without and with the look-alike rules (same hits, same run)", "",
              f"Look-alike rows: messages with no personal data whose names are public figures, brands, "
              f"holidays, grades, titles or places as topics ({alike['with']['look_alike_rows']} rows).", "",
              "| rules | name P/R | location P/R | address P/R | overall P/R | look-alike rows flagged | "
              "recall on rows with PII |", "|---|---|---|---|---|---|---|"]
    for label in ("without", "with"):
        row = alike[label]
        cells = [f"{_pct((row['by_type'][t] or {}).get('precision'))} / {_pct((row['by_type'][t] or {}).get('recall'))}"
                 for t in ("name", "location", "address", "overall")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['look_alike_rows_flagged']} of "
                     f"{row['look_alike_rows']} | {_pct(row['recall_on_rows_with_pii'])} |")
    chitchat = result["chitchat"]
    lines += ["", f"## Chitchat: messages changed ({chitchat['sample']})", "",
              "| engine | changed | share | hits per type | messages/s |", "|---|---|---|---|---|"]
    for engine in ENGINE_TYPES:
        c = chitchat[engine]
        lines.append(f"| {engine} | {c['changed']:,} / {c['messages']:,} | {100 * c['share_changed']:.2f}% | "
                     f"{', '.join(f'{k} {v}' for k, v in c['hits'].items()) or '–'} | {c['messages_per_second']:,} |")
    speed = result["presidio_batching"]
    lines += ["", f"Presidio messages/s: {', '.join(f'{k} {v}' for k, v in speed.items())}. "
              f"Scrubbing the whole corpus ({result['corpus_messages']:,} messages) at the clean stage's batching: "
              f"regex ~{result['corpus_seconds']['regex']:.0f} s, presidio ~{result['corpus_seconds']['presidio']:.0f} s.",
              "", "## Presidio's errors on the labelled set", ""]
    lines += [f"- #{e['id']} `{e['text']}` gold {e['gold']} got {e['predicted']}" for e in result["labelled"]["presidio_errors"]]
    lines += ["", "## Chitchat messages presidio changed (seeded sample)", ""]
    lines += [f"- `{e['before']}` → `{e['after']}`" for e in chitchat["presidio"]["examples"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=Path, default=ROOT / "bench/pii/labelled.jsonl")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="for its seed")
    parser.add_argument("--sample", type=int, default=20_000, help="chitchat messages scrubbed (0: all)")
    parser.add_argument("--examples", type=int, default=25)
    parser.add_argument("--machine", required=True, help="the machine's line, e.g. '2-core AMD EPYC, AVX-512 BF16'")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    seed = load_params(args.params).seed

    rows = load_labelled(args.labelled)
    texts = [row["text"] for row in rows]
    labelled = {"messages": len(rows), "gold_spans": sum(len(row["spans"]) for row in rows)}
    for engine, types in ENGINE_TYPES.items():
        labelled[engine], errors = score(rows, find_pii(texts, types, engine))
        labelled[f"{engine}_errors"] = errors
    scored, claimed = presidio_inputs(rows)
    labelled["presidio_threshold_sweep"] = threshold_sweep(rows, scored, claimed)
    labelled["presidio_look_alikes"] = look_alikes(rows, scored, claimed)

    # As the clean stage sees them: NFKC-normalised (params' clean.unicode_normalization).
    corpus = [normalize_text(text, "NFKC") for text in chitchat_messages()]
    sample = random.Random(seed).sample(corpus, args.sample) if 0 < args.sample < len(corpus) else corpus
    chitchat = {"sample": f"{len(sample):,} of {len(corpus):,} messages, random.Random({seed})"}
    for engine in ENGINE_TYPES:
        chitchat[engine] = corpus_changes(sample, engine, args.examples, seed)
    result = {
        "machine": args.machine, "labelled": labelled, "chitchat": chitchat,
        "presidio_batching": batching(sample[:1000]), "corpus_messages": len(corpus),
        "corpus_seconds": {e: len(corpus) / chitchat[e]["messages_per_second"] for e in ENGINE_TYPES},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    report = markdown(result)
    args.out.with_suffix(".md").write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
