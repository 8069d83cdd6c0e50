"""Reproducible QLoRA fine-tuning of Llama-family chat models on chat history."""

from qlora_pipeline.remote_code import refuse_bitsandbytes_hub_kernel

__version__ = "0.1.0"

# Before anything imports bitsandbytes: it would otherwise fetch and run a kernel from the Hub on
# AVX512-BF16 CPUs (remote_code.py).
refuse_bitsandbytes_hub_kernel()
