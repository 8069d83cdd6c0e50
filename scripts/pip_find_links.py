"""uv's ``--find-links`` flags for the wheel folders pip is configured with (``pip config list``: pip's config
files and ``PIP_FIND_LINKS``), for the interpreter that runs this.

uv reads no pip configuration. A machine that keeps torch's CPU build in such a folder (as pip finds it there)
would otherwise have uv take PyPI's torch of the same version, the CUDA build. Prints nothing where pip has none.
"""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys


def find_links(listing: str) -> list[str]:
    """The find-links locations of ``pip config list``'s output (``scope.find-links='a b'`` lines), each once."""
    links: list[str] = []
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith(".find-links") and value:
            for link in ast.literal_eval(value).split():
                if link not in links:
                    links.append(link)
    return links


if __name__ == "__main__":
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    print(" ".join(f"--find-links {shlex.quote(link)}" for link in find_links(listing)))
