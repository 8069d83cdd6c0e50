"""No code from the Hub runs on import: bitsandbytes' CPU backend asks the `kernels` package for one.

Each case imports bitsandbytes in a fresh interpreter, as a stage does, with a `kernels` package of
the test's own first on the path that records every kernel asked for, and bitsandbytes told that
the CPU has AVX512-BF16 (the only CPUs where it asks), so the case holds on any machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

FAKE_KERNELS = '''
import json, os

def get_kernel(repo_id, **kwargs):
    with open(os.environ["KERNELS_ASKED"], "a") as f:
        f.write(json.dumps(repo_id) + "\\n")
    raise RuntimeError("the test's kernels package holds no kernel")
'''

# Runs before `import bitsandbytes`: bitsandbytes.functional is patched as it loads, so the CPU
# backend, imported after it, reads has_avx512bf16() as True.
CLAIM_AVX512_BF16 = '''
import importlib.abc, sys

class ClaimBF16(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "bitsandbytes.functional":
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, ClaimBF16())
'''


def _run_with_fake_kernels(tmp_path, script: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`script` after CLAIM_AVX512_BF16, with the test's `kernels` first on the path; the kernels it was asked for."""
    (tmp_path / "fake" / "kernels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "fake" / "kernels" / "__init__.py").write_text(FAKE_KERNELS)
    asked = tmp_path / "asked.jsonl"
    asked.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(ROOT / "src")]),
           "KERNELS_ASKED": str(asked)}
    proc = subprocess.run([sys.executable, "-c", CLAIM_AVX512_BF16 + script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = asked.read_text().splitlines() if asked.exists() else []
    return proc, [json.loads(line) for line in lines]


def _import(tmp_path, first: str) -> tuple[list[str], str]:
    """The kernels bitsandbytes asked for, and its stderr, importing `first` and then bitsandbytes."""
    proc, asked = _run_with_fake_kernels(tmp_path, textwrap.dedent(f"""
        {first}
        import bitsandbytes
        assert bitsandbytes.functional.has_avx512bf16()
    """))
    return asked, proc.stderr


def test_bitsandbytes_alone_asks_the_hub_for_a_kernel(tmp_path):
    """The behaviour guarded against, so the next test means something: without our package it asks."""
    asked, stderr = _import(tmp_path, "pass")
    assert asked == ["kernels-community/quantization-bitsandbytes"]
    assert "Failed to load CPU gemm_4bit_forward" in stderr


@pytest.mark.parametrize("first", ["import qlora_pipeline", "from qlora_pipeline.modeling import loading"])
def test_after_our_package_bitsandbytes_asks_for_no_kernel_and_warns_nothing(tmp_path, first):
    asked, stderr = _import(tmp_path, first)
    assert asked == []
    assert "gemm_4bit_forward" not in stderr and "kernels" not in stderr


def test_kernels_stays_importable_after_bitsandbytes_loaded(tmp_path):
    """The guard hides `kernels` only while bitsandbytes' CPU backend loads; transformers may import it later."""
    proc, _ = _run_with_fake_kernels(tmp_path, "import qlora_pipeline, bitsandbytes, kernels; "
                                               "print(kernels.get_kernel.__name__)")
    assert proc.stdout.strip() == "get_kernel"


def test_the_guard_says_when_it_comes_too_late():
    proc = subprocess.run([sys.executable, "-c", "import bitsandbytes, qlora_pipeline.remote_code as r; "
                           "print(r.refuse_bitsandbytes_hub_kernel())"],
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    # `import qlora_pipeline.remote_code` ran the package's __init__ after bitsandbytes was in.
    assert proc.stdout.strip() == "False"
