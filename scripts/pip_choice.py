"""The wheel pip would install for one requirement, as arguments for ``uv pip install`` to install that wheel.

pip asks its whole configuration (``pip install --dry-run --report``): its indexes and wheel folders, their
precedence, the environment's ``PIP_*`` variables and any constraints file. uv reads none of it, so on a machine
whose pip finds torch's CPU build (a wheel folder, the CPU index as an extra index) uv alone took PyPI's torch of
the same version, the CUDA build. Exits non-zero, saying why, where pip chooses nothing.

A wheel in a folder is named by that folder and its exact version, so that uv installs it as pip would have (a
``name @ file://...`` requirement is recorded as a direct URL, and ``pip freeze`` then prints this machine's path);
any other as ``name@url``. The words are separated by spaces (pip splits its own find-links on whitespace too):

    python scripts/pip_choice.py torch==2.13.0   ->   --find-links /opt/wheels torch==2.13.0+cpu
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname


def uv_arguments(report: dict) -> list[str]:
    """``uv pip install``'s arguments for the one distribution of a ``pip install --report`` of one requirement."""
    (install,) = report["install"]
    name, version = install["metadata"]["name"], install["metadata"]["version"]
    url = install["download_info"]["url"]
    if urlparse(url).scheme == "file":
        return ["--find-links", str(Path(url2pathname(urlparse(url).path)).parent), f"{name}=={version}"]
    return [f"{name}@{url}"]


if __name__ == "__main__":
    requirement = sys.argv[1]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                           "--quiet", "--report", "-", requirement], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"pip_choice: pip found no wheel for {requirement}:\n{proc.stderr.strip()}")
    print(" ".join(uv_arguments(json.loads(proc.stdout))))
