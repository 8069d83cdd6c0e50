"""scrub: each PII type is replaced by its placeholder and counted once; look-alikes stay."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from qlora_pipeline.data.pii import ALL_PII_TYPES, MAX_SWEEPS, PII_TYPES, PLACEHOLDERS, find_pii, scrub

ALL = PII_TYPES


def p(pii_type, text, expected, count=1):
    return pytest.param(pii_type, text, expected, count, id=f"{pii_type}:{text}")


POSITIVE = [
    # email
    p("email", "Contact me at john.doe@example.com today.", "Contact me at <EMAIL> today."),
    p("email", "jane+newsletter@mail.example.co.uk", "<EMAIL>"),
    p("email", "Send to a_b-c@sub.domain.org, thanks", "Send to <EMAIL>, thanks"),
    p("email", "(bob@example.io)", "(<EMAIL>)"),
    p("email", "wait...bob@example.com", "wait...<EMAIL>"),
    p("email", "x@example.com;y@example.org", "<EMAIL>;<EMAIL>", 2),
    # phone
    p("phone", "Call (555) 123-4567 now", "Call <PHONE> now"),
    p("phone", "555-123-4567", "<PHONE>"),
    p("phone", "fax: 555.123.4567.", "fax: <PHONE>."),
    p("phone", "US +1 555 123 4567", "US <PHONE>"),
    p("phone", "London +44 20 7946 0958, ask for Sam", "London <PHONE>, ask for Sam"),
    p("phone", "Berlin +49 30 1234567", "Berlin <PHONE>"),
    p("phone", "text 5551234567!", "text <PHONE>!"),
    p("phone", "+1 (555) 123-4567 or 1-800-555-1234", "<PHONE> or <PHONE>", 2),
    # url
    p("url", "Docs: https://example.com/path?q=1&r=2.", "Docs: <URL>."),
    p("url", "old http://example.org", "old <URL>"),
    p("url", "see www.example.com/page)", "see <URL>)"),
    p("url", "(see example.com/page)", "(see <URL>)"),
    p("url", "read (https://en.wikipedia.org/wiki/Foo_(bar)).", "read (<URL>)."),
    p("url", "[docs](https://x.io/docs)", "[docs](<URL>)"),
    p("url", "admin at http://192.168.1.1/login", "admin at <URL>"),
    # ip
    p("ip", "server 192.168.1.1 is down", "server <IP> is down"),
    p("ip", "bind 10.0.0.255:8080.", "bind <IP>:8080."),
    p("ip", "from 0.0.0.0 to 255.255.255.255", "from <IP> to <IP>", 2),
    p("ip", "v6 2001:db8::1 here", "v6 <IP> here"),
    p("ip", "link fe80::1ff:fe23:4567:890a", "link <IP>"),
    p("ip", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "<IP>"),
    p("ip", "mapped ::ffff:192.0.2.1.", "mapped <IP>."),
    # card
    p("card", "card 4111 1111 1111 1111.", "card <CARD>."),
    p("card", "4111-1111-1111-1111", "<CARD>"),
    p("card", "amex 378282246310005 ok", "amex <CARD> ok"),
    p("card", "amex 3782 822463 10005", "amex <CARD>"),
    p("card", "mc 5555555555554444", "mc <CARD>"),
    # ssn
    p("ssn", "SSN 123-45-6789", "SSN <SSN>"),
    p("ssn", "ssn: 123 45 6789.", "ssn: <SSN>."),
    p("ssn", "(078-05-1120)", "(<SSN>)"),
    p("ssn", "899-99-9999", "<SSN>"),
    # handle
    p("handle", "thanks @john_doe!", "thanks <HANDLE>!"),
    p("handle", "ping @jane.doe.", "ping <HANDLE>."),
    p("handle", "(@Bob123)", "(<HANDLE>)"),
    p("handle", "follow @alice@mastodon.social", "follow <HANDLE>"),
    p("handle", "@a and @_b", "<HANDLE> and <HANDLE>", 2),
]


@pytest.mark.parametrize("pii_type,text,expected,count", POSITIVE)
def test_chosen_type_is_replaced_and_counted(pii_type, text, expected, count):
    out, counts = scrub(text, [pii_type])
    assert out == expected
    assert dict(counts) == {pii_type: count}


@pytest.mark.parametrize("pii_type,text,expected,count", POSITIVE)
def test_with_all_types_each_hit_is_claimed_by_its_own_type(pii_type, text, expected, count):
    # No other detector may take the hit first or add a hit of its own.
    out, counts = scrub(text, ALL)
    assert out == expected
    assert dict(counts) == {pii_type: count}


NEGATIVE = [
    ("email", "user@localhost"),
    ("email", "name @ example.com"),
    ("email", "bob@"),
    ("email", "a@b.c"),
    ("email", "bob.@example.com"),
    ("email", "@example.com"),
    ("phone", "555-1234"),
    ("phone", "12345"),
    ("phone", "555-123-4567-8"),
    ("phone", "+20 points"),
    ("phone", "+12.50"),
    ("phone", "timestamp 1716912345"),
    ("phone", "ISBN 978-0-306-40615-7"),
    ("url", "example.com"),
    ("url", "node.js and setup.py"),
    ("url", "e.g. this"),
    ("url", "https:// alone"),
    ("url", "www"),
    ("url", "src/example.com/page"),
    ("ip", "999.1.1.1"),
    ("ip", "256.1.1.1"),
    ("ip", "1.2.3"),
    ("ip", "v1.2.3.4"),
    ("ip", "1.2.3.4.5"),
    ("ip", "10:30:15"),
    ("ip", "std::vector"),
    ("ip", "Foo::Bar"),
    ("ip", "abc::def"),
    ("card", "4111 1111 1111 1112"),
    ("card", "4111111111111112"),
    ("card", "1234 5678 9012 3456"),
    ("card", "4111 1111 1111 1111 1111"),
    ("card", "411111111111"),
    ("ssn", "000-12-3456"),
    ("ssn", "666-12-3456"),
    ("ssn", "900-12-3456"),
    ("ssn", "999-12-3456"),
    ("ssn", "123-00-4567"),
    ("ssn", "123-45-0000"),
    ("ssn", "123-45 6789"),
    ("ssn", "1234-56-7890"),
    ("handle", "bob@example.com"),
    ("handle", "meet @ home"),
    ("handle", "see you @10am"),
    ("handle", "a@b"),
    ("handle", "file.@name"),
]


@pytest.mark.parametrize("pii_type,text", [pytest.param(t, s, id=f"{t}:{s}") for t, s in NEGATIVE])
def test_look_alikes_stay(pii_type, text):
    out, counts = scrub(text, [pii_type])
    assert out == text
    assert dict(counts) == {}


NOT_PII_NUMBERS = [
    "Meet at 10:30 or 10:30:15.",
    "On 2019-05-02 or 05/02/2019 or 02.05.2019.",
    "Back in 2019, and 2019-2020.",
    "It costs $12.50, or 1,299.99 in total.",
    "Upgrade 1.2.3 to v3.10.4 please.",
    "We won 3-2 and then 21-17.",
    "Up 45% today, 12.5% this year.",
    "I have 3 cats, 42 dogs and 1000 fish.",
    "My PIN is 1234.",
    "4111 1111 1111 1112",
    "Order #123456789012 shipped.",
]


@pytest.mark.parametrize("text", NOT_PII_NUMBERS)
def test_numbers_that_are_not_pii_stay(text):
    out, counts = scrub(text, ALL)
    assert out == text
    assert dict(counts) == {}


MIXED = [
    (
        "Email john@example.com or call (555) 123-4567, see https://example.com/x.",
        "Email <EMAIL> or call <PHONE>, see <URL>.",
        {"email": 1, "phone": 1, "url": 1},
    ),
    (
        "From 192.168.0.1 @admin paid with 4111-1111-1111-1111, SSN 123-45-6789.",
        "From <IP> <HANDLE> paid with <CARD>, SSN <SSN>.",
        {"ip": 1, "handle": 1, "card": 1, "ssn": 1},
    ),
    (
        "@bob: mail bob@example.com, not at 10:30; +44 20 7946 0958 or www.example.com/contact!",
        "<HANDLE>: mail <EMAIL>, not at 10:30; <PHONE> or <URL>!",
        {"handle": 1, "email": 1, "phone": 1, "url": 1},
    ),
    (
        "https://x.com/?u=bob@example.com&ip=10.0.0.1 and 10.0.0.2",
        "<URL> and <IP>",
        {"url": 1, "ip": 1},
    ),
]


@pytest.mark.parametrize("text,expected,counts", MIXED)
def test_mixed_sentences_count_each_hit_once(text, expected, counts):
    out, got = scrub(text, ALL)
    assert out == expected
    assert dict(got) == counts


@pytest.mark.parametrize(
    "text,types,expected,counts",
    [
        # The "@example.com" of an e-mail is not a handle, even when e-mails are kept.
        ("mail bob@example.com or @bob", ["handle"], "mail bob@example.com or <HANDLE>", {"handle": 1}),
        ("mail bob@example.com or @bob", ["email"], "mail <EMAIL> or @bob", {"email": 1}),
        ("call 555-123-4567 or see https://x.org", ["url"], "call 555-123-4567 or see <URL>", {"url": 1}),
        # A valid card is a card, never a phone, whether or not cards are scrubbed.
        ("4111 1111 1111 1111 / 555-123-4567", ["phone"], "4111 1111 1111 1111 / <PHONE>", {"phone": 1}),
        # The IP inside a URL belongs to the URL: kept when only IPs are scrubbed.
        ("http://10.0.0.1/x and 10.0.0.2", ["ip"], "http://10.0.0.1/x and <IP>", {"ip": 1}),
        ("SSN 123-45-6789, ip 1.2.3.4", ["ip", "ssn"], "SSN <SSN>, ip <IP>", {"ip": 1, "ssn": 1}),
    ],
)
def test_types_not_chosen_are_left_alone(text, types, expected, counts):
    out, got = scrub(text, types)
    assert out == expected
    assert dict(got) == counts


def test_each_type_alone_replaces_what_it_replaces_with_all_types():
    text = " ".join(case.values[1] for case in POSITIVE) + " " + " ".join(t for _, t, _ in MIXED)
    _, all_counts = scrub(text, ALL)
    assert set(all_counts) == set(PII_TYPES)
    for pii_type in PII_TYPES:
        _, alone = scrub(text, [pii_type])
        assert dict(alone) == {pii_type: all_counts[pii_type]}, pii_type


def test_unknown_type_raises_naming_it_and_the_valid_ones():
    with pytest.raises(ValueError, match="'passport'") as excinfo:
        scrub("bob@example.com", ["email", "passport"])
    for name in PII_TYPES:
        assert name in str(excinfo.value)


def test_type_names_are_exact():
    with pytest.raises(ValueError, match="'EMAIL'"):
        scrub("", ["EMAIL"])


def test_no_types_changes_nothing():
    out, counts = scrub("bob@example.com 555-123-4567", [])
    assert out == "bob@example.com 555-123-4567"
    assert dict(counts) == {}


def test_types_may_be_any_iterable_or_one_name():
    text = "bob@example.com @bob"
    assert scrub(text, (t for t in ["handle", "handle"])) == ("bob@example.com <HANDLE>", Counter(handle=1))
    assert scrub(text, "email") == ("<EMAIL> @bob", Counter(email=1))


def test_counts_are_a_counter_and_placeholders_cover_every_type():
    _, counts = scrub("a@example.com b@example.com", ["email"])
    assert isinstance(counts, Counter)
    assert counts["email"] == 2
    assert set(PLACEHOLDERS) == set(ALL_PII_TYPES)
    assert PLACEHOLDERS["email"] == "<EMAIL>" and PLACEHOLDERS["handle"] == "<HANDLE>"


@pytest.mark.parametrize("text", ["a." * 50_000, "1-" * 50_000, "a@" * 50_000, "x@" + "a." * 50_000])
def test_long_tokens_are_scanned_in_linear_time(text):
    # Shapes that make a forward e-mail pattern backtrack quadratically (tens of seconds here);
    # a linear scan takes milliseconds, so the bound leaves room for slow machines.
    start = time.perf_counter()
    out, counts = scrub(text, ALL)
    assert time.perf_counter() - start < 5
    assert out == text
    assert dict(counts) == {}


# PII glued to PII: a rule refuses a match next to a word character or "+", so the second item
# is found only once the first is claimed. One sweep left it in the output, for a second scrub.
GLUED = [
    ("@bob+44 20 7946 0958", "<HANDLE><PHONE>", {"handle": 1, "phone": 1}),
    ("@bob(555) 123-4567", "<HANDLE><PHONE>", {"handle": 1, "phone": 1}),
    ("@alice@bob", "<HANDLE><HANDLE>", {"handle": 2}),
    ("@alice@mastodon.social192.168.0.10", "<HANDLE><IP>", {"handle": 1, "ip": 1}),
    ("alice@example.com-bob@example.com", "<EMAIL><EMAIL>", {"email": 2}),
]


@pytest.mark.parametrize("text,expected,counts", GLUED)
def test_pii_glued_to_pii_is_found_and_nothing_is_left(text, expected, counts):
    out, got = scrub(text, ALL)
    assert (out, dict(got)) == (expected, counts)
    assert scrub(out, ALL) == (out, Counter())


@pytest.mark.parametrize("text", ["alice@example.comalice@example.com", "alice@example.com-bob@example.com"])
def test_hits_never_overlap(text):
    # The second "@" once took its local part from the first e-mail's domain ("comalice"),
    # claiming those characters twice and counting two e-mails where one stood.
    hits = find_pii([text], ALL)[0]
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(hits, hits[1:])), hits


def test_a_crafted_chain_of_glued_handles_costs_at_most_max_sweeps():
    # Each sweep frees one more handle of "@a@b@a@b...": the sweep limit keeps the time linear.
    text = "@a@b" * 2_000
    start = time.perf_counter()
    _, counts = scrub(text, ALL)
    assert time.perf_counter() - start < 10  # sweeping until nothing is left: about half a minute here
    assert dict(counts) == {"handle": MAX_SWEEPS}
