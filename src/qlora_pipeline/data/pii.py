"""PII scrubbing: replace e-mails, phones, URLs, IPs, cards, SSNs and handles by typed placeholders.

Two engines. ``regex`` (the rules in this file) finds the types in ``PII_TYPES``. ``presidio``
runs the same rules, then Microsoft Presidio (spaCy NER plus a street-address pattern, in
``pii_presidio.py``, imported only then) for names, addresses and locations (``PRESIDIO_TYPES``).

Detection always runs in a fixed priority order over the *original* text, and every hit claims
its characters, so a later detector never sees them. Only the chosen types are then replaced.
What callers can rely on:

* one piece of text is counted once, as the type that claims it first
  (the IP inside a URL is part of the URL, the ``@example.com`` of an e-mail is not a handle);
* what a type replaces does not depend on which other types were chosen
  (``scrub(t, ["ip"])`` replaces exactly the IPs that ``scrub(t, PII_TYPES)`` replaces);
* the regex types find nothing in their own output: detection sweeps again while a sweep
  finds something, since a hit can free its neighbour (up to ``MAX_SWEEPS`` hits glued together).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

# The type names live apart so that config can validate params without importing the detectors.
from qlora_pipeline.data.pii_types import ALL_PII_TYPES, ENGINES, PII_TYPES, PLACEHOLDERS, PRESIDIO_TYPES  # noqa: F401

# Who claims text first. URLs can contain e-mails, IPs and @names; e-mails contain @names;
# cards and SSNs are digit groups a looser phone pattern could otherwise take; IPs before
# phones so a dotted quad is never read as digit groups.
_PRIORITY: tuple[str, ...] = ("url", "email", "card", "ssn", "ip", "phone", "handle")

# Claimed characters are overwritten with this before later detectors run. It is not a word
# char, digit, dot or space, so it behaves like the edge of a token, as a placeholder would.
_MASK = "\x00"

Span = tuple[int, int]

# --- building blocks -------------------------------------------------------------------------

# A DNS label: letters/digits, inner hyphens (underscores tolerated inside for sloppy hosts).
_LABEL = r"[^\W_](?:[\w-]*[^\W_])?"
# A dotted host name ending in an alphabetic TLD, e.g. mail.example.co.uk.
_DOMAIN = rf"(?:{_LABEL}\.)+[^\W\d_]{{2,63}}"

# --- url -------------------------------------------------------------------------------------

# Characters a URL may run over; quotes, angle brackets and backticks usually delimit it.
_URL_CHAR = r"[^\s<>\"'`\x00]"
# Bare domains are only URLs with one of these TLDs *and* a path: without that, "node.js"
# or "setup.py" would look like hosts.
_COMMON_TLDS = (
    "com|org|net|edu|gov|mil|int|info|biz|io|co|ai|app|dev|me|tv|us|uk|ca|de|fr|es|it|nl|eu"
    "|au|in|jp|cn|ru|br|ch|se|no|pl|ly|gg|xyz|site|online|tech|blog"
)
_URL_RE = re.compile(
    # An explicit scheme or "www." starts a URL anywhere (but not in the middle of a word).
    rf"(?:https?://|(?<![\w.@/-])www\d{{0,3}}\.)(?=[^\W_]|\[){_URL_CHAR}+"
    # A bare domain needs a common TLD and a path; "@" before it means an e-mail's domain.
    rf"|(?<![\w.@/-])(?:{_LABEL}\.)+(?:{_COMMON_TLDS})(?::\d{{2,5}})?/{_URL_CHAR}*",
    re.IGNORECASE,
)
# Sentence punctuation after a URL belongs to the sentence.
_URL_TRAILING = ".,;:!?*"
# A closing bracket is kept only when the URL opened it, as in wiki/Foo_(bar).
_URL_CLOSERS = {")": "(", "]": "[", "}": "{"}

# --- email -----------------------------------------------------------------------------------

# An e-mail is found outwards from its "@". Scanning forward for a local part would restart
# at every dot or dash of a long token and go quadratic; RFC 5321 caps the local part at 64
# characters, so looking back at most that far keeps the scan linear.
_EMAIL_LOCAL_MAX = 64
_EMAIL_LOCAL_RE = re.compile(
    # "@" before the local part means a fediverse handle (@alice@host), left to the handle rule.
    r"(?<![\w%+@-])"
    r"[\w%+-]+(?:\.[\w%+-]+)*\Z"  # plus-addressing included; dots only between runs
)
_EMAIL_DOMAIN_RE = re.compile(rf"{_DOMAIN}(?!\w)")

# --- card ------------------------------------------------------------------------------------

_CARD_RE = re.compile(
    # Not the tail of a longer number ("1 4111..." or "0.4111...").
    r"(?<!\w)(?<!\d[ .,-])"
    r"(?:\d{13,19}|\d{4}(?:[ -]\d{1,6}){1,4})"  # contiguous, or 4 digits then space/dash groups
    r"(?!\w)(?![ .,-]\d)"  # nor its head
)
_CARD_DIGITS = range(13, 20)

# --- ssn -------------------------------------------------------------------------------------

_SSN_RE = re.compile(
    r"(?<!\w)(?<!\d-)"
    r"(?P<area>\d{3})(?P<sep>[ -])(?P<group>\d{2})(?P=sep)(?P<serial>\d{4})"
    r"(?!\w)(?!-\d)"
)

# --- ip --------------------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"  # 0-255, no leading zeros
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_HEX = r"[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join(
    [
        rf"(?:{_HEX}:){{6}}{_IPV4}",  # full form ending in a dotted quad
        rf"::(?:ffff(?::0{{1,4}})?:)?{_IPV4}",  # IPv4-mapped, ::ffff:192.0.2.1
        rf"(?:{_HEX}:){{1,4}}:{_IPV4}",
        rf"(?:{_HEX}:){{7}}{_HEX}",  # full form
        # compressed forms: "::" stands for one or more zero groups, at most 8 groups in all
        rf"(?:{_HEX}:){{1,7}}:",
        rf"(?:{_HEX}:){{1,6}}:{_HEX}",
        rf"(?:{_HEX}:){{1,5}}(?::{_HEX}){{1,2}}",
        rf"(?:{_HEX}:){{1,4}}(?::{_HEX}){{1,3}}",
        rf"(?:{_HEX}:){{1,3}}(?::{_HEX}){{1,4}}",
        rf"(?:{_HEX}:){{1,2}}(?::{_HEX}){{1,5}}",
        rf"{_HEX}:(?::{_HEX}){{1,6}}",
        rf":(?:(?::{_HEX}){{1,7}}|:)",
    ]
)
_IP_RE = re.compile(
    # A dot before means a longer dotted number (v1.2.3.4 or 1.2.3.4.5's tail).
    r"(?<![\w.])"
    # IPv6 must not continue past its ends ("a:b:c" runs); a port after IPv4 is fine.
    rf"(?:(?<!:)(?P<v6>{_IPV6})(?![\w:])|{_IPV4}(?!\w))"
    r"(?!\.\d)"
)
_DIGIT = re.compile(r"\d")

# --- phone -----------------------------------------------------------------------------------

_PHONE_RE = re.compile(
    # Not glued to a word, a "+", or the end of a dotted/dashed number.
    r"(?<![\w+])(?<!\d[.,-])"
    r"(?:"
    # International: +country code, then groups split by space/dot/dash, "(0)" trunk allowed.
    r"(?P<intl>\+\d{1,15}(?:[ .-]?\(\d{1,4}\) ?\d{1,12}|[ .-]\d{1,12}){0,6})(?![ .,-]\d)"
    # North American: optional leading 1, then (555) 123-4567, 555-123-4567 with one separator
    # used throughout (so 3-2-4 or mixed runs are not phones), or ten bare digits. Bare ones
    # must start with 2-9 like real area codes, which also keeps Unix timestamps (1.7e9) out.
    r"|(?:1[ .-]?)?(?:\(\d{3}\) ?\d{3}[ .-]?\d{4}|\d{3}(?P<sep>[ .-])\d{3}(?P=sep)\d{4}|[2-9]\d{9})"
    r"(?![.,-]\d)"
    r")"
    r"(?!\w)"
)
# E.164 caps a number at 15 digits; under 8 is a code or a quantity ("+20", "+12.50").
_INTL_DIGITS = range(8, 16)

# --- handle ----------------------------------------------------------------------------------

_HANDLE_RE = re.compile(
    # Not after a word char or dot (that "@" belongs to an e-mail) nor another "@".
    r"(?<![\w.@])"
    # Starts with a letter or "_" so "@10am" and "@ 5" stay; inner dots as on Instagram.
    r"@[^\W\d]\w*(?:\.\w+)*"
    rf"(?:@{_DOMAIN})?"  # fediverse form @alice@mastodon.social is one handle
)


# --- detectors: text -> spans of one type ----------------------------------------------------


def _trim_url(url: str) -> str:
    """Drop trailing sentence punctuation and closing brackets the URL did not open."""
    while url:
        last = url[-1]
        if last in _URL_TRAILING:
            url = url[:-1]
        elif last in _URL_CLOSERS and url.count(last) > url.count(_URL_CLOSERS[last]):
            url = url[:-1]
        else:
            break
    return url


def _url_spans(text: str) -> Iterator[Span]:
    for match in _URL_RE.finditer(text):
        yield match.start(), match.start() + len(_trim_url(match.group()))


def _email_spans(text: str) -> Iterator[Span]:
    at, claimed = text.find("@"), 0
    while at != -1:
        # The local part starts after the previous e-mail: in "a@b.comc@d.org" the "comc" of the
        # first one's domain is not the second one's local part (hits must not overlap).
        local = _EMAIL_LOCAL_RE.search(text, max(claimed, at - _EMAIL_LOCAL_MAX), at)
        domain = _EMAIL_DOMAIN_RE.match(text, at + 1) if local else None
        if domain:
            yield local.start(), domain.end()
            claimed = domain.end()
            at = text.find("@", domain.end())
        else:
            at = text.find("@", at + 1)


def _luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number carries."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _is_card(match: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return len(digits) in _CARD_DIGITS and _luhn_ok(digits)


def _is_ssn(match: re.Match[str]) -> bool:
    """SSA never issues area 000, 666 or 900-999, group 00 or serial 0000."""
    area = int(match["area"])
    return (
        area != 0
        and area != 666
        and area < 900
        and match["group"] != "00"
        and match["serial"] != "0000"
    )


def _is_ip(match: re.Match[str]) -> bool:
    # Hex-and-colon text with no digit ("abc::def", Ruby's "A::B") is code, not an address.
    return match["v6"] is None or _DIGIT.search(match["v6"]) is not None


def _is_phone(match: re.Match[str]) -> bool:
    if match["intl"] is None:
        return True
    return len(_DIGIT.findall(match["intl"])) in _INTL_DIGITS


def _regex_spans(
    pattern: re.Pattern[str], is_valid: Callable[[re.Match[str]], bool] | None = None
) -> Callable[[str], Iterator[Span]]:
    def spans(text: str) -> Iterator[Span]:
        for match in pattern.finditer(text):
            if is_valid is None or is_valid(match):
                yield match.span()

    return spans


_DETECTORS: dict[str, Callable[[str], Iterator[Span]]] = {
    "url": _url_spans,
    "email": _email_spans,
    "card": _regex_spans(_CARD_RE, _is_card),
    "ssn": _regex_spans(_SSN_RE, _is_ssn),
    "ip": _regex_spans(_IP_RE, _is_ip),
    "phone": _regex_spans(_PHONE_RE, _is_phone),
    "handle": _regex_spans(_HANDLE_RE),
}


# --- scrub -----------------------------------------------------------------------------------


def _chosen_types(types: Iterable[str], engine: str) -> frozenset[str]:
    if engine not in ENGINES:
        raise ValueError(f"unknown PII engine {engine!r}; valid engines are: {', '.join(ENGINES)}")
    # A lone string is one type name, not an iterable of one-letter names.
    chosen = frozenset([types] if isinstance(types, str) else types)
    unknown = sorted(chosen - set(ALL_PII_TYPES))
    if unknown:
        raise ValueError(
            f"unknown PII type {unknown[0]!r}; valid types are: {', '.join(ALL_PII_TYPES)}"
        )
    needs_presidio = sorted(chosen & set(PRESIDIO_TYPES))
    if needs_presidio and engine != "presidio":
        raise ValueError(f"PII type {needs_presidio[0]!r} needs engine='presidio'")
    return chosen


def _mask(text: str, spans: list[Span]) -> str:
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [text[cursor:start], _MASK * (end - start)]
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


# Each sweep after the first needs a hit the previous one made next to it, so only a chain of
# more hits than this, glued together, can be left partly found. The limit bounds the time a
# crafted text ("@a@b@a@b...": one more handle per sweep) can take to linear.
MAX_SWEEPS = 32


def _find_hits(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) hits, each claimed by the highest-priority type.

    The types are swept in priority order, each hit masked, and swept again until a sweep finds
    nothing: a claim can clear the context a type was refused for. In "@bob+44 20 7946 0958" the
    phone is glued to "@bob" until the handle claims it; one sweep would leave the number in the
    output, for a second scrub to find. Every sweep runs every type, so what a chosen type
    replaces still does not depend on the other types chosen.
    """
    hits: list[tuple[int, int, str]] = []
    masked = text
    for _ in range(MAX_SWEEPS):
        found = []
        for pii_type in _PRIORITY:
            spans = list(_DETECTORS[pii_type](masked))
            found += [(start, end, pii_type) for start, end in spans]
            if spans:
                masked = _mask(masked, spans)
        if not found:
            break
        hits += found
    return sorted(hits)


# Placeholders already in the text (an earlier scrub, or the user's own) are claimed, so a
# second pass, or NER reading "<NAME>" as a name, cannot replace them again.
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS.values()))


def placeholder_spans(text: str) -> list[Span]:
    """Where placeholders (``<EMAIL>``, ``<NAME>``, ...) already stand in ``text``."""
    return [match.span() for match in _PLACEHOLDER_RE.finditer(text)]


def find_pii(texts: Sequence[str], types: Iterable[str], engine: str = "regex") -> list[list[tuple[int, int, str]]]:
    """The (start, end, type) hits of the chosen types in each text, as ``scrub`` replaces them.

    Raises ValueError as ``scrub`` does.
    """
    chosen = _chosen_types(types, engine)
    if not chosen:
        return [[] for _ in texts]
    regex_hits = [_find_hits(text) for text in texts]
    if chosen & set(PRESIDIO_TYPES):
        from qlora_pipeline.data import pii_presidio  # spaCy loads only when a Presidio type is chosen

        claimed = [
            [(start, end) for start, end, _ in hits] + placeholder_spans(text)
            for text, hits in zip(texts, regex_hits)
        ]
        presidio_hits = pii_presidio.find_hits(texts, claimed)
        regex_hits = [sorted(a + b) for a, b in zip(regex_hits, presidio_hits)]
    # Types not chosen claimed their text above (so no chosen type took it); they are not hits.
    return [[hit for hit in hits if hit[2] in chosen] for hits in regex_hits]


def _replace(text: str, hits: list[tuple[int, int, str]]) -> tuple[str, Counter[str]]:
    counts: Counter[str] = Counter()
    pieces, cursor = [], 0
    for start, end, pii_type in hits:
        pieces += [text[cursor:start], PLACEHOLDERS[pii_type]]
        cursor = end
        counts[pii_type] += 1
    pieces.append(text[cursor:])
    return "".join(pieces), counts


def scrub_many(
    texts: Sequence[str], types: Iterable[str], engine: str = "regex"
) -> list[tuple[str, Counter[str]]]:
    """``scrub`` for many texts at once; the presidio engine runs spaCy over them in batches."""
    hits = find_pii(texts, types, engine)
    return [_replace(text, text_hits) for text, text_hits in zip(texts, hits)]


def scrub(text: str, types: Iterable[str], engine: str = "regex") -> tuple[str, Counter[str]]:
    """Replace every hit of the chosen PII types by its placeholder.

    Args:
        text: the text to scrub.
        types: names from ``PII_TYPES``, and with ``engine="presidio"`` also ``PRESIDIO_TYPES``.
        engine: ``regex`` or ``presidio`` (see the module docstring).

    Returns:
        The new text and a Counter of replacements per type (chosen types with hits only).

    Raises:
        ValueError: an unknown type or engine, or a Presidio type with ``engine="regex"``.
    """
    return scrub_many([text], types, engine)[0]


def count_pii(text: str, types: Iterable[str], engine: str = "regex") -> Counter[str]:
    """Hits per chosen type in ``text``, found exactly as ``scrub`` finds them."""
    return scrub(text, types, engine)[1]
