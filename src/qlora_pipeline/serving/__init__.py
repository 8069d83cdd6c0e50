"""Talking to the persona: chat, an OpenAI-compatible server and a merged export. No stage imports this package."""
