"""Dequantizing the 4-bit base once for generation gives the outputs the 4-bit layers give, faster.

On `small_base` (the real tokenizer on a small random Llama, quantized by quantize-load): the layers swapped
and the bits compared are the same code on any Llama."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline import hardware
from qlora_pipeline.modeling import inference
from qlora_pipeline.modeling.engine import Engine, Request, chat_prompt_ids
from qlora_pipeline.modeling.loading import load_saved_base
from qlora_pipeline.modeling.quantization import linear4bit_modules
from qlora_pipeline.modeling.stacked_lora import RowAdapters, StackedLoRA, cast_shared

CONVERSATIONS = [[{"role": "user", "content": "hey, how was your weekend?"}],
                 [{"role": "user", "content": "what are you cooking tonight? tell me everything"}]]


def with_lora(model):
    """A LoRA wrapper with non-zero weights, so the adapter path is exercised too."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_dequantized_layers_give_the_4bit_outputs_bit_for_bit(small_base, compute_dtype):
    quantized, tokenizer = load_saved_base(small_base, compute_dtype)
    quantized = with_lora(quantized)
    dense, _ = load_saved_base(small_base, compute_dtype)
    dense = with_lora(dense)
    layers = len(linear4bit_modules(dense))  # 7 a decoder layer
    assert layers == 7 * dense.config.num_hidden_layers
    assert inference.dequantize_for_inference(dense) == layers and not linear4bit_modules(dense)
    batch = tokenizer(["<|im_start|>user\nhi there, long time no see<|im_end|>\n"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(dense(**batch).logits, quantized(**batch).logits)
        with dense.disable_adapter(), quantized.disable_adapter():  # the zero-shot base side of evaluate
            assert torch.equal(dense(**batch).logits, quantized(**batch).logits)
    requests = [Request(ids, "default", max_new_tokens=12) for ids in chat_prompt_ids(tokenizer, CONVERSATIONS)]
    assert [r.token_ids for r in Engine(dense, tokenizer).run(requests)] == \
        [r.token_ids for r in Engine(quantized, tokenizer).run(requests)]


@pytest.mark.slow
def test_a_block_runs_dequantized_and_gets_the_same_4bit_layers_back_after(small_base, monkeypatch):
    """export's reference: the 4-bit base with an adapter, dequantized for its passes only, merged after."""
    model, tokenizer = load_saved_base(small_base, "float32")
    model = with_lora(model)
    layers = linear4bit_modules(model)
    batch = tokenizer(["<|im_start|>user\nhi there, long time no see<|im_end|>\n"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
        with inference.dequantized(model, True) as replaced:
            assert replaced == len(layers) and not linear4bit_modules(model)
            assert torch.equal(model(**batch).logits, expected)
        after = linear4bit_modules(model)
        assert len(after) == len(layers) and all(a is b for a, b in zip(after, layers))  # the very layers, in place
        assert torch.equal(model(**batch).logits, expected)
        with pytest.raises(RuntimeError, match="inside"):  # put back when the block fails too
            with inference.dequantized(model, True):
                raise RuntimeError("inside")
        assert all(a is b for a, b in zip(linear4bit_modules(model), layers))
        with inference.dequantized(model, False) as replaced:  # the setting says no: nothing changes
            assert replaced == 0 and len(linear4bit_modules(model)) == len(layers)
    made, real = [], inference.DequantizedLinear4bit

    def out_of_memory_at_the_sixth(layer):
        if len(made) == 5:
            raise MemoryError("out of memory")
        made.append(real(layer))
        return made[-1]

    monkeypatch.setattr(inference, "DequantizedLinear4bit", out_of_memory_at_the_sixth)
    with pytest.raises(MemoryError):  # the swap itself failed midway: the five swapped layers go back too
        with inference.dequantized(model, True):
            pass
    assert len(made) == 5 and all(a is b for a, b in zip(linear4bit_modules(model), layers))
    assert len(linear4bit_modules(model)) == len(layers)


@pytest.mark.slow
def test_auto_dequantizes_on_a_cpu_only_when_the_dense_weights_fit(small_base, monkeypatch):
    model, _ = load_saved_base(small_base, "float32")
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


def test_a_cast_is_kept_for_the_next_layer_reading_the_same_tensor_and_made_again_when_it_changes():
    x = torch.randn(5, 8)
    first = cast_shared(x, torch.bfloat16)
    assert torch.equal(first, x.to(torch.bfloat16)) and first.dtype == torch.bfloat16
    assert cast_shared(x, torch.bfloat16) is first  # the key and value projections take it as is
    assert cast_shared(x, torch.float32) is x  # already in the dtype: no cast
    assert cast_shared(x, torch.float16).dtype == torch.float16  # another dtype: its own cast
    x.mul_(3)  # edited in place (its version counter moves): cast again
    again = cast_shared(x, torch.bfloat16)
    assert again is not first and torch.equal(again, x.to(torch.bfloat16))
    other = x.clone()  # another tensor of the same values: its own cast
    assert cast_shared(other, torch.bfloat16) is not again
    tracked = torch.randn(3, 4, requires_grad=True)  # under autograd every cast is its own node of the graph
    assert cast_shared(tracked, torch.bfloat16) is not cast_shared(tracked, torch.bfloat16)
    assert cast_shared(tracked, torch.bfloat16).grad_fn is not None
    with torch.inference_mode():  # no version counter there: always a fresh cast
        frozen = torch.randn(3, 4)
        assert cast_shared(frozen, torch.bfloat16) is not cast_shared(frozen, torch.bfloat16)


@pytest.mark.slow
def test_the_shared_casts_change_no_bit_of_mixed_adapter_logits_under_bfloat16_autocast(small_base, monkeypatch):
    """What a bfloat16 machine runs: the dense layers and the stacked LoRA updates share one cast of their input
    (and A's cast is kept); the logits must be those of every layer casting for itself, as before."""
    from qlora_pipeline.modeling import stacked_lora

    model, tokenizer = load_saved_base(small_base, "bfloat16")
    model = with_lora(model)
    inference.dequantize_for_inference(model)
    rows = RowAdapters(model)
    assert rows.stacked is not None
    batch = tokenizer(["<|im_start|>user\nhi there, long time no see<|im_end|>\n",
                       "<|im_start|>user\nwhat are you cooking tonight?<|im_end|>\n"], return_tensors="pt", padding=True)

    def logits():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), rows.rows(["default", None]):
            return model(**batch).logits

    made, real = [], cast_shared

    def counted(x, dtype):
        made.append(real(x, dtype))  # held: a tensor returned twice is one object, and its id stays its own
        return made[-1]

    monkeypatch.setattr(inference, "cast_shared", counted)
    monkeypatch.setattr(stacked_lora, "cast_shared", counted)
    shared = logits()
    taken_again = len(made) - len({id(t) for t in made})
    # per layer: q's cast taken by q's update, k, k's update, v, v's update; the same for gate/up (3)
    assert taken_again >= 8 * model.config.num_hidden_layers, (taken_again, len(made))
    monkeypatch.setattr(inference, "cast_shared", lambda x, dtype: x.to(dtype))
    monkeypatch.setattr(StackedLoRA, "_lora_a_operands", lambda self, x, a: (x.to(a.dtype), a))
    assert torch.equal(shared, logits())


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_the_lora_operands_are_the_ones_peft_would_compute_for_every_input_dtype(autocast_dtype):
    """A float32 adapter: the input goes straight to autocast's dtype where float32 holds it exactly, and the
    product is the one of the input cast to the adapter's dtype and then by autocast, bit for bit."""
    stacked = StackedLoRA.__new__(StackedLoRA)  # the operands need only its cast cache
    stacked._converted = {}
    a = torch.randn(4, 16)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = torch.randn(3, 16, dtype=dtype)
        with torch.autocast("cpu", dtype=autocast_dtype):
            assert torch.equal(torch.nn.functional.linear(*stacked._lora_a_operands(x, a)),
                               torch.nn.functional.linear(x.to(a.dtype), a)), dtype
    with torch.no_grad():
        a.mul_(2)  # the stacked tensor edited in place: A is cast again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(stacked._lora_a_operands(torch.randn(2, 16), a)[1], a.to(torch.bfloat16))
