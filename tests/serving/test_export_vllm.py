"""export --format vllm: what vLLM refuses in an adapter is refused here, by name; a good adapter gets its command."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from conftest import default_params_file
from qlora_pipeline import cli
from qlora_pipeline.serving import vllm

GOOD = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "bias": "none", "use_dora": False, "modules_to_save": None,
        "target_modules": ["q_proj", "v_proj", "down_proj"], "rank_pattern": {}}


@pytest.mark.parametrize("change, says", [
    ({"use_dora": True}, "use_dora: vLLM does not serve DoRA adapters; train with train.lora.use_dora: false"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']: vLLM serves none"),
    ({"bias": "lora_only"}, "train.lora.bias: none"),
    ({"lora_bias": True}, "train.lora.bias: none"),
    ({"r": 1024}, "r 1024: vLLM's largest --max-lora-rank is 512"),
    ({"rank_pattern": {"q_proj": 600}}, "r 600"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules ['embed_tokens']"),
    ({"peft_type": "IA3"}, "peft_type IA3"),
])
def test_each_feature_vllm_refuses_is_named_with_its_param(change, says):
    assert vllm.problems(GOOD) == []
    found = vllm.problems({**GOOD, **change})
    assert len(found) == 1 and says in found[0]


@pytest.mark.parametrize("change, says", [
    ({"r": "sixteen"}, "r 'sixteen'"), ({"r": None}, "r None"), ({"r": [16]}, "r [16]"), ({"r": -4}, "r -4"),
    ({"r": 0}, "r 0"), ({"r": 16.7}, "r 16.7"), ({"r": True}, "r True"),
    ({"rank_pattern": {"q_proj": "8"}}, "rank_pattern['q_proj'] '8'"), ({"rank_pattern": [8]}, "rank_pattern [8]"),
])
def test_a_damaged_rank_is_named_not_read_as_a_number(change, says):
    """A traceback for "sixteen", null or [16]; a --max-lora-rank of 1 for -4 and 0, and of 16 for 16.7."""
    (found,) = vllm.problems({**GOOD, **change})
    assert found.startswith(says), found
    assert ("a whole number >= 1" in found) != ("a mapping" in found), found
    assert "adapter_config.json is damaged" in found


@pytest.mark.parametrize("rank, flag", [(1, 1), (4, 8), (8, 8), (16, 16), (17, 32), (300, 320), (512, 512)])
def test_the_command_asks_for_the_smallest_max_lora_rank_that_fits(rank, flag):
    assert vllm.max_lora_rank({**GOOD, "r": rank}) == flag


def test_a_good_adapter_gets_its_files_and_the_serve_command(tmp_path, persona_adapters, quantized_base, capsys):
    out = tmp_path / "alice-vllm"
    assert cli.main(["export", "--format", "vllm", "--adapter", f"alice={persona_adapters['alice']}", "--out", str(out),
                     "--base", str(quantized_base), "--params", str(default_params_file(tmp_path))]) == 0
    assert sorted(p.name for p in (out / "adapter").iterdir()) == sorted(vllm.ADAPTER_FILES)
    script = (out / "serve-vllm.sh").read_text()
    words = shlex.split(script.split("\n", 4)[4].replace("\\\n", " "))
    assert words[:3] == ["vllm", "serve", str(Path(quantized_base).resolve())]
    r = json.loads((out / "adapter/adapter_config.json").read_text())["r"]
    assert {"--quantization", "bitsandbytes", "--enable-lora", "--lora-modules", "alice=./adapter",
            "--max-lora-rank", str(vllm.max_lora_rank({"r": r})), "--host", "127.0.0.1"} <= set(words)
    assert "You are alice." in capsys.readouterr().out  # requests should carry the trained system prompt


def test_an_adapter_vllm_cannot_load_is_refused_before_anything_is_written(tmp_path, persona_adapters,
                                                                             quantized_base, capsys):
    import shutil

    dora = tmp_path / "dora"
    shutil.copytree(persona_adapters["alice"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    out = tmp_path / "out"
    assert cli.main(["export", "--format", "vllm", "--adapter", str(dora), "--out", str(out),
                     "--base", str(quantized_base), "--params", str(default_params_file(tmp_path))]) == 1
    assert "vLLM cannot serve this adapter: use_dora" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
