"""The wheel pip would install for one requirement, as a ``name @ url`` requirement for uv to install.

pip asks its whole configuration (``pip install --dry-run --report``): its indexes and wheel folders, their
precedence, the environment's ``PIP_*`` variables and any constraints file. uv reads none of it, so on a machine
whose pip finds torch's CPU build (a wheel folder, the CPU index as an extra index) uv alone took PyPI's torch of
the same version, the CUDA build. Exits non-zero, saying why, where pip chooses nothing.

    python scripts/pip_choice.py torch==2.13.0   ->   torch @ file:///.../torch-2.13.0%2Bcpu-...whl
"""

from __future__ import annotations

import json
import subprocess
import sys


def chosen(report: dict) -> str:
    """The ``name @ url`` of the one distribution in a ``pip install --report`` of one requirement."""
    (install,) = report["install"]
    return f"{install['metadata']['name']} @ {install['download_info']['url']}"


if __name__ == "__main__":
    requirement = sys.argv[1]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                           "--quiet", "--report", "-", requirement], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"pip_choice: pip found no wheel for {requirement}:\n{proc.stderr.strip()}")
    print(chosen(json.loads(proc.stdout)))
