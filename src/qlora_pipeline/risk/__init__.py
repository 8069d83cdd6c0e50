"""What a run risks: personal data, memorization, canaries, bias, safety drift, fit and cost (the risk stage).

The prompt sets the stage sends to both models ship with the package, beside this file, so a
change to one is a change to the stage's code (a DVC dependency) and re-runs it.
"""

from pathlib import Path

PROMPTS = Path(__file__).parent / "prompts"
