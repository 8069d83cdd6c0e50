"""Reproducible QLoRA fine-tuning of Llama-family chat models on chat history."""

__version__ = "0.1.0"
