"""The language-model loss on target tokens only, projecting to the vocabulary only where it is needed.

A causal LM's head turns every position's hidden state into logits over the whole vocabulary
(49k for SmolLM2, 32k for Llama 2) before the loss masks all but the reply's tokens. For chat
replies most positions are prompt, so that projection, its float32 upcast and its gradient are
mostly thrown away: on the default run the full logits of one evaluation batch (16 x 256 x 49k)
take 0.8 GB. Here the hidden states of target positions are gathered first and only they meet the head.
"""

from __future__ import annotations

from typing import Any

from qlora_pipeline.labels import IGNORE_INDEX


def causal_lm_parts(model: Any) -> tuple[Any, Any] | None:
    """(decoder, head) of a ``*ForCausalLM`` under a PEFT wrapper, or None for anything else.

    LoRA layers live inside the decoder's modules, so calling the decoder directly runs them.
    A distributed wrapper (DDP) must see its own forward call to synchronise gradients: None.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = getattr(inner, "model", None), getattr(inner, "lm_head", None)
    if decoder is None or head is None or not hasattr(inner, "get_output_embeddings"):
        return None
    return decoder, head


def target_token_nll(hidden: Any, labels: Any, head: Any) -> tuple[Any, Any]:
    """Per example: summed negative log-likelihood of the label tokens, and how many there are.

    ``hidden`` is the decoder's last hidden state (batch, length, hidden); position t predicts
    label t + 1, as in every causal LM loss.
    """
    import torch

    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    logits = head(hidden[:, :-1][mask]).float()
    token_nll = torch.nn.functional.cross_entropy(logits, shifted[mask], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(shifted)[mask]
    per_example = torch.zeros(labels.shape[0], dtype=token_nll.dtype, device=token_nll.device)
    per_example = per_example.index_add(0, rows, token_nll)
    return per_example, mask.sum(dim=1)
