"""Who is who: speakers named in params (``split.persona``, ``clean.exclude_speakers``) found in the data.

Chat-app exports name speakers by display name, so a param may be written as the person sees
it: case, spacing, Unicode form and the invisible marks the apps add are ignored when matching,
as long as exactly one speaker fits. A name that fits no one is an error that offers the close
ones, because a misspelt ``exclude_speakers`` entry would silently keep a person who did not
consent.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

from qlora_pipeline.errors import PipelineError

# Marks the apps insert around names, numbers and their own notices: left-to-right and
# right-to-left marks, bidi embeddings/isolates, zero-width no-break space (BOM), word joiner.
BIDI_MARKS = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff\u2060]")
# Spaces the apps write inside names and times ("9:15\u202fPM"): narrow no-break, no-break, thin.
ODD_SPACES = re.compile("[\u202f\u00a0\u2009]")


def clean_name(name: str) -> str:
    """A display name without the invisible marks around it (WhatsApp wraps phone numbers in them)."""
    return ODD_SPACES.sub(" ", BIDI_MARKS.sub("", name)).strip()


def name_key(name: str) -> str:
    """What two spellings of one name share: Unicode form, case, spacing and invisible marks ignored."""
    return " ".join(unicodedata.normalize("NFKC", clean_name(name)).casefold().split())


def message_counts(conversations: Iterable[dict]) -> Counter:
    return Counter(m["speaker"] for c in conversations for m in c["messages"])


def speakers_in_order(conversations: Iterable[dict]) -> list[str]:
    """Every speaker once, in order of first message."""
    return list(dict.fromkeys(m["speaker"] for c in conversations for m in c["messages"]))


def find_speaker(name: str, counts: Counter, key: str, source: str) -> str:
    """The speaker ``name`` refers to (exactly, else by :func:`name_key`); an error names ``key`` otherwise."""
    if name in counts:
        return name
    wanted = name_key(name)
    fits = sorted(s for s in counts if name_key(s) == wanted)
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise PipelineError(f"{key}: '{name}' fits several speakers in {source}: {', '.join(fits)}; "
                            "write one of them exactly")
    by_key = {name_key(s): s for s in counts}
    close = [by_key[k] for k in difflib.get_close_matches(wanted, list(by_key), n=3, cutoff=0.6)]
    hint = f"did you mean {', '.join(repr(s) for s in close)}? " if close else ""
    top = ", ".join(f"{s} ({n} messages)" for s, n in counts.most_common(3))
    raise PipelineError(f"{key}: speaker '{name}' does not occur in {source}; {hint}"
                        f"the most active are {top}")


def resolve_persona(conversations: list[dict], persona: str, source: str) -> str:
    """``all``; ``auto`` -> the persona the data declares, else the speaker with the most messages; a name."""
    counts = message_counts(conversations)
    if persona == "all":
        return persona
    if persona == "auto":
        declared = {c.get("meta", {}).get("persona") for c in conversations}
        if len(declared) == 1 and None not in declared:
            return declared.pop()
        # Ties go to the smallest id so the choice never depends on file order.
        return min(counts, key=lambda speaker: (-counts[speaker], speaker))
    return find_speaker(persona, counts, "split.persona", f"{source} (after clean.exclude_speakers)")
