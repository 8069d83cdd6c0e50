"""PII type names, engines and placeholders: what params may name, without importing any detector."""

from __future__ import annotations

PII_TYPES: tuple[str, ...] = ("email", "phone", "url", "ip", "card", "ssn", "handle")
# Found only by the presidio engine, after every regex type (so they never take a regex hit).
PRESIDIO_TYPES: tuple[str, ...] = ("name", "address", "location")
ALL_PII_TYPES: tuple[str, ...] = PII_TYPES + PRESIDIO_TYPES
ENGINES: tuple[str, ...] = ("regex", "presidio")

PLACEHOLDERS: dict[str, str] = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "url": "<URL>",
    "ip": "<IP>",
    "card": "<CARD>",
    "ssn": "<SSN>",
    "handle": "<HANDLE>",
    "name": "<NAME>",
    "address": "<ADDRESS>",
    "location": "<LOCATION>",
}
