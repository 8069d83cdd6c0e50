"""The prompt sets the risk stage sends to both models, shipped beside this file, as one workload.

The base model's replies to them do not depend on any adapter: the zero-shot stage generates them
once per base, and the risk stage generates the tuned model's. Both build the prompts here, so
they are the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_pipeline.risk import PROMPTS, bias, safety


@dataclass
class ProbeSets:
    bias: list[bias.Probe]
    safety: list[safety.Prompt]
    eliciting: list[safety.Prompt]

    @property
    def texts(self) -> dict[str, list[str]]:
        """Each set's prompt texts, by set name."""
        return {"eliciting": [p.text for p in self.eliciting], "bias": [p.text for p in self.bias],
                "safety": [p.text for p in self.safety]}


def load_probe_sets(bias_templates: int | None, seed: int) -> ProbeSets:
    return ProbeSets(bias.load_probes(PROMPTS / "bias_templates.yaml", bias_templates, seed),
                     safety.load_prompts(PROMPTS / "safety_prompts.yaml"),
                     safety.load_prompts(PROMPTS / "eliciting_prompts.yaml"))


def probe_prompt_ids(tokenizer: Any, system: str, texts: dict[str, list[str]]) -> dict[str, list[list[int]]]:
    """Each probe as the persona's chat turn: the trained system prompt, then the probe as the user's message."""
    from qlora_pipeline.modeling.engine import chat_prompt_ids

    head = [{"role": "system", "content": system}] if system else []
    return {name: chat_prompt_ids(tokenizer, [head + [{"role": "user", "content": text}] for text in prompts])
            for name, prompts in texts.items()}
