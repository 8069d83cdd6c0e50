"""Dequantizing the 4-bit base once for generation gives the outputs the 4-bit layers give, faster."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline import hardware
from qlora_pipeline.modeling import inference
from qlora_pipeline.modeling.engine import Engine, Request, chat_prompt_ids
from qlora_pipeline.modeling.loading import load_saved_base
from qlora_pipeline.modeling.quantization import linear4bit_modules

CONVERSATIONS = [[{"role": "user", "content": "hey, how was your weekend?"}],
                 [{"role": "user", "content": "what are you cooking tonight? tell me everything"}]]


def with_lora(model):
    """A LoRA wrapper with non-zero weights, so the adapter path is exercised too."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_dequantized_layers_give_the_4bit_outputs_bit_for_bit(quantized_base, compute_dtype):
    quantized, tokenizer = load_saved_base(quantized_base, compute_dtype)
    quantized = with_lora(quantized)
    dense, _ = load_saved_base(quantized_base, compute_dtype)
    dense = with_lora(dense)
    assert inference.dequantize_for_inference(dense) == 210 and not linear4bit_modules(dense)
    batch = tokenizer(["<|im_start|>user\nhi there, long time no see<|im_end|>\n"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(dense(**batch).logits, quantized(**batch).logits)
        with dense.disable_adapter(), quantized.disable_adapter():  # the zero-shot base side of evaluate
            assert torch.equal(dense(**batch).logits, quantized(**batch).logits)
    requests = [Request(ids, "default", max_new_tokens=12) for ids in chat_prompt_ids(tokenizer, CONVERSATIONS)]
    assert [r.token_ids for r in Engine(dense, tokenizer).run(requests)] == \
        [r.token_ids for r in Engine(quantized, tokenizer).run(requests)]


@pytest.mark.slow
def test_auto_dequantizes_on_a_cpu_only_when_the_dense_weights_fit(quantized_base, monkeypatch):
    model, _ = load_saved_base(quantized_base, "float32")
    needed = inference.dense_bytes(model)
    assert needed == sum(m.weight.quant_state.shape.numel() for m in linear4bit_modules(model)) * 4
    monkeypatch.setattr(hardware, "free_memory_bytes", lambda: 8 * needed)
    assert inference.should_dequantize("auto", model) is True
    monkeypatch.setattr(hardware, "free_memory_bytes", lambda: 2 * needed)
    assert inference.should_dequantize("auto", model) is False
    assert inference.should_dequantize(True, model) is True and inference.should_dequantize(False, model) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU runs bitsandbytes' fused kernels
    monkeypatch.setattr(hardware, "free_memory_bytes", lambda: 8 * needed)
    assert inference.should_dequantize("auto", model) is False
