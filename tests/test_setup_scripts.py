"""Set-up's helper: the wheel pip would install for a requirement (scripts/pip_choice.py), which uv then installs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def fake_wheel(folder: Path, name: str, version: str) -> Path:
    """A wheel of nothing but its metadata, enough for pip to choose it."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def pip_choice(requirement: str, wheels: Path) -> subprocess.CompletedProcess:
    """The script under a pip configured, by its environment variables, to look in ``wheels`` alone."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    return subprocess.run([sys.executable, "scripts/pip_choice.py", requirement], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_wheel_pips_configuration_finds_is_named_for_uv(tmp_path):
    """uv reads no pip configuration: where pip's finds torch's CPU build, uv alone took PyPI's CUDA build."""
    fake_wheel(tmp_path / "wheels", "qlorafake", "1.0")
    chosen = fake_wheel(tmp_path / "wheels", "qlorafake", "1.1")
    proc = pip_choice("qlorafake==1.1", tmp_path / "wheels")
    assert proc.returncode == 0, proc.stderr
    # its folder and exact version (as pip installs it: `name @ file://` would be a direct URL, this machine's path
    # in `pip freeze`)
    assert proc.stdout == f"--find-links {chosen.parent} qlorafake==1.1\n"


def test_where_pip_finds_no_wheel_it_says_so_and_exits_non_zero(tmp_path):
    """Set-up then stops (the Makefile's `|| exit 1`) instead of handing uv an empty requirement."""
    fake_wheel(tmp_path / "wheels", "qlorafake", "1.0")
    proc = pip_choice("qlorafake==2.0", tmp_path / "wheels")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("pip_choice: pip found no wheel for qlorafake==2.0:\n")
    assert "qlorafake==2.0" in proc.stderr.split("\n", 1)[1]  # pip's own words follow


def test_a_wheel_from_an_index_is_named_by_its_url():
    """One that pip takes from an index (the CPU builds' index as an extra index) is passed as a URL: uv would not
    look in that index."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pip_choice", ROOT / "scripts" / "pip_choice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    url = "https://download.pytorch.org/whl/cpu/torch-2.13.0%2Bcpu-cp311-cp311-linux_x86_64.whl"
    report = {"install": [{"metadata": {"name": "torch", "version": "2.13.0+cpu"}, "download_info": {"url": url}}]}
    assert module.uv_arguments(report) == [f"torch@{url}"]
