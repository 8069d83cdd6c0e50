"""FSDP-QLoRA's preparation: a 4-bit base stored as bfloat16 wraps, runs forward and backward under FSDP.

train.accelerate_config: fsdp_qlora failed on an H200 (bench/results/gpu-h200/session.txt): FSDP
refused a decoder layer, "Must flatten tensors with uniform dtype but got torch.bfloat16 and
torch.float32", because PEFT's k-bit preparation had upcast the norms beside the bfloat16-stored
4-bit weights. The same refusal happens on a CPU with FSDP over gloo, so it is checked here: in a
process of its own (one process group of one rank), wrapped with the policy the Trainer uses for
PEFT models (each LoRA layer its own unit, each decoder layer one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import pipeline_env

SCRIPT = r'''
import json, os, sys, warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qlora_pipeline.modeling.preparation import prepare_4bit_base, stores_4bit_as_float

tiny, work = Path(sys.argv[1]), Path(sys.argv[2])
result = {}
for storage in ("bfloat16", "uint8"):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16,
                                      bnb_4bit_quant_storage=getattr(torch, storage))
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=quantization, dtype=torch.bfloat16,
                                                 use_kernels=False)
    model.save_pretrained(work / storage)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(work / storage)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        model, tokenizer = prepare_4bit_base(work / storage, "bfloat16", activation_checkpointing=True)
    frozen = {str(p.dtype) for n, p in model.named_parameters() if "norm" in n}
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    result[storage] = {"float_storage": stores_4bit_as_float(model), "norm_dtypes": sorted(frozen),
                       "deprecations": [str(w.message) for w in shown if "checkpointing" in str(w.message)]}

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1")
torch.distributed.init_process_group("gloo")
model, tokenizer = prepare_4bit_base(work / "bfloat16", "bfloat16", activation_checkpointing=True)
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
wrapped = FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                                   device_id=torch.device("cpu"))
ids = torch.tensor([tokenizer("hello there, how was the hike")["input_ids"]])
with torch.autocast("cpu", dtype=torch.bfloat16):
    loss = wrapped(input_ids=ids, labels=ids).loss
loss.backward()
trainable = [p for p in wrapped.parameters() if p.requires_grad]
result["fsdp"] = {"units": sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules()),
                  "loss": float(loss), "trainable_flat_params": len(trainable),
                  "with_gradient": sum(p.grad is not None for p in trainable),
                  "nonzero_gradient": sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable)}
torch.distributed.destroy_process_group()
print(json.dumps(result))
'''


def test_a_bfloat16_stored_4bit_base_wraps_and_trains_under_fsdp(tiny_llama, tmp_path):
    from qlora_pipeline.launching import free_port

    script = tmp_path / "fsdp_check.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tiny_llama), str(tmp_path), str(free_port())],
                          env={**pipeline_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Stored as bfloat16: the norms stay bfloat16, so each decoder layer flattens into one dtype.
    # Activation checkpointing is turned on by its transformers 5 name, and PEFT's calls of the
    # deprecated one (uint8) are kept quiet: no checkpointing FutureWarning either way.
    assert result["bfloat16"] == {"float_storage": True, "norm_dtypes": ["torch.bfloat16"], "deprecations": []}
    # The default uint8 storage keeps PEFT's preparation: norms upcast to float32 for stable training.
    assert result["uint8"] == {"float_storage": False, "norm_dtypes": ["torch.float32"], "deprecations": []}
    fsdp = result["fsdp"]
    # 2 decoder layers + 7 LoRA-wrapped linears each (A and B: 28 units) + the root.
    assert fsdp["units"] > 2 * 7
    assert fsdp["loss"] == pytest.approx(fsdp["loss"]) and fsdp["loss"] > 0  # finite, not NaN
    # Every LoRA unit got a gradient through the frozen, bfloat16-stored base; at the first step only
    # the B matrices' are non-zero (B starts at zero, so A's gradient, B^T times the upstream, is zero).
    assert fsdp["trainable_flat_params"] == 28 and fsdp["with_gradient"] == 28
    assert fsdp["nonzero_gradient"] == 14
