"""Each row's next token under its own decoding: penalties, n-gram ban, temperature, top-k, top-p, a seeded draw.

The rows of one batch may each decode differently. Every control computes what transformers' own
processor computes for that row alone (``RepetitionPenaltyLogitsProcessor``,
``NoRepeatNGramLogitsProcessor``, ``ExponentialDecayLengthPenalty``, ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, in ``generate``'s order; tested against them), vectorised over the rows with
each row's own value. A client's logit bias comes after the penalties, the ban and the length decay, where
``generate`` puts a sequence bias first: OpenAI's -100 and 100 ban and pick a token whatever the other controls
do with its score. The n-gram ban keeps an index per row, extended one token at a time, rather
than rebuilding every n-gram of the sequence each step.

A sampled row draws from its own generator, seeded by its request, so it picks the same tokens
whatever it is batched with. The draw is the Gumbel-max trick (the argmax of the scores plus
Gumbel noise, one number of the row's stream per vocabulary entry per step), which samples the
same distribution as a softmax draw but, unlike the inverse of a cumulative sum over the whole
vocabulary, does not move when a batch's shape shifts the logits in their last bits: only a
near-tie of two perturbed scores could, where the inverse CDF flipped often on flat distributions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_NEG_INF = float("-inf")
# A temperature below this is greedy, as vLLM takes it (its _SAMPLING_EPS): the scores divided by 1e-38 overflow
# float32 to infinities and NaN, and a draw picked whatever came first among them (an end token, a quote).
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class RowDecoding:
    """How one row picks its tokens; ``generate()``'s names. temperature 0 (below ``GREEDY_BELOW``) = greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; over the prompt and the reply, as transformers does
    no_repeat_ngram_size: int = 0  # 0 = off; n-grams of the prompt count too, as in transformers
    presence_penalty: float = 0.0  # OpenAI's: over the reply's own tokens only
    frequency_penalty: float = 0.0
    # (start_index, decay_factor): past start_index new tokens, the end-of-turn score grows by decay_factor
    # per token (transformers' ExponentialDecayLengthPenalty); None = off
    exponential_decay_length_penalty: tuple[int, float] | None = None
    # (token id, bias) pairs added to the scores after the penalties, the n-gram ban and the length decay, before
    # temperature, top-k and top-p (OpenAI's logit_bias; transformers' SequenceBiasLogitsProcessor for one-token
    # sequences), -100 a ban and 100 a pick (bias_extremes_): the client's last word. Before the length decay,
    # -100 on the end token made a reply end sooner (the decay raises that score by its size); () = off
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class RowState:
    """One row's memory for its decoding: its n-gram index and its random stream."""

    def __init__(self, prompt_ids: Sequence[int], decoding: RowDecoding, seed: int | None):
        self.decoding = decoding
        self.generated = 0  # tokens of the reply so far
        n = decoding.no_repeat_ngram_size
        self.tokens: list[int] = list(prompt_ids) if n else []
        self.ngrams: dict[tuple[int, ...], set[int]] = {}
        if n:
            for start in range(len(self.tokens) - n + 1):
                self._index(start)
        self.generator: torch.Generator | None = None
        if not decoding.greedy:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)))
            # A client's seed may be any integer (OpenAI's API takes 64-bit ones); torch takes 0 <= seed < 2**63.
            self.generator = torch.Generator().manual_seed(seed % 2**63)

    def _index(self, start: int) -> None:
        n = self.decoding.no_repeat_ngram_size
        gram = self.tokens[start:start + n]
        self.ngrams.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def push(self, token: int) -> None:
        self.generated += 1
        n = self.decoding.no_repeat_ngram_size
        if n:
            self.tokens.append(token)
            if len(self.tokens) >= n:
                self._index(len(self.tokens) - n)

    def banned(self) -> list[int]:
        """Tokens that would complete an n-gram already in the sequence (transformers' rule)."""
        n = self.decoding.no_repeat_ngram_size
        if not n or len(self.tokens) + 1 < n:
            return []
        return sorted(self.ngrams.get(tuple(self.tokens[len(self.tokens) - n + 1:]), ()))

    def gumbel(self, vocabulary: int) -> torch.Tensor:
        """One step's Gumbel noise: ``vocabulary`` numbers of this row's stream."""
        uniform = torch.rand(vocabulary, generator=self.generator)
        return -torch.log(-torch.log(uniform))


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def repetition_penalty_(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's seen tokens' scores divided (positive) or multiplied (negative) by its penalty, in place.

    ``seen`` ([k, vocabulary]) and ``penalty`` ([k, 1]) belong to the rows ``rows`` of ``scores``
    (default: every row). Only the seen entries are read and written, as transformers' processor
    gathers and scatters them: the same numbers as penalising the whole vocabulary and keeping the
    seen entries, which cost six passes over ``[batch, vocabulary]`` a step (a second of evaluate's
    fifteen on the AMX Xeon).
    """
    local, columns = seen.nonzero(as_tuple=True)
    if not len(local):
        return scores
    index = local if rows is None else rows[local]
    values, factor = scores[index, columns], penalty[local, 0]
    scores[index, columns] = torch.where(values < 0, values * factor, values / factor)
    return scores


def logit_bias_(scores: torch.Tensor, settings: Sequence[RowDecoding]) -> torch.Tensor:
    """Each row's ``logit_bias`` added to its scores, in place: one scatter for the batch."""
    entries = [(i, token, bias) for i, s in enumerate(settings) for token, bias in s.logit_bias]
    rows, tokens, biases = zip(*entries)
    device = scores.device
    return scores.index_put_((torch.tensor(rows, device=device), torch.tensor(tokens, device=device)),
                             torch.tensor(biases, dtype=scores.dtype, device=device), accumulate=True)


# OpenAI's ends of logit_bias: -100 bans a token, 100 picks it (or one of the tokens so biased). Added, they were
# outweighed: the length decay raises the end token's score without bound (1.3 ** 30 times its size, 30 tokens past
# its start), and the repetition controls act on the others.
BIAS_BANS, BIAS_PICKS = -100.0, 100.0


def bias_extremes_(scores: torch.Tensor, settings: Sequence[RowDecoding]) -> torch.Tensor:
    """In place, per row: its tokens biased -100 to -inf, and where it biased some 100, every other token to -inf
    (unless the n-gram ban forbids all of those: the row then picks as the other controls left it)."""
    for i, setting in enumerate(settings):
        banned = [token for token, bias in setting.logit_bias if bias <= BIAS_BANS]
        picked = [token for token, bias in setting.logit_bias if bias >= BIAS_PICKS]
        if banned:
            scores[i, banned] = _NEG_INF
        if picked and torch.isfinite(scores[i, picked]).any():
            kept = scores[i, picked].clone()
            scores[i] = _NEG_INF
            scores[i, picked] = kept
    return scores


def length_decay(scores: torch.Tensor, rows: Sequence[RowState], eos: Sequence[int]) -> torch.Tensor:
    """Each row past its start index: its end-of-turn scores raised by ``|score| * (factor ** past - 1)``."""
    boosts = [(i, row.decoding.exponential_decay_length_penalty, row.generated) for i, row in enumerate(rows)
              if row.decoding.exponential_decay_length_penalty is not None]
    boosts = [(i, factor ** (generated - start) - 1) for i, (start, factor), generated in boosts if generated > start]
    if not boosts or not eos:
        return scores
    index = torch.tensor([i for i, _ in boosts], device=scores.device)
    columns = torch.tensor(list(eos), device=scores.device)
    current = scores[index][:, columns]
    boost = current.abs() * torch.tensor([b for _, b in boosts], device=scores.device).unsqueeze(1)
    scores = scores.clone()
    scores[index.unsqueeze(1), columns] = current + boost.masked_fill(~torch.isfinite(current), 0.0)
    return scores


def top_k(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, every score below its k-th largest to -inf (ties with the k-th stay); k = 0 keeps all."""
    vocabulary = scores.shape[-1]
    k = k.clamp(max=vocabulary)
    largest = int(k.max())
    if largest <= 0:
        return scores
    kth = scores.topk(largest, dim=-1).values.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))
    remove = (scores < kth) & (k > 0).unsqueeze(1)
    return scores.masked_fill(remove, _NEG_INF)


# Nucleus candidates looked at first: the nucleus almost always lies within them, and a top-k of them
# costs a few times less than sorting the whole vocabulary (49k entries for SmolLM2).
TOP_P_CANDIDATES = 1024


def top_p(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest set of tokens whose probability reaches its p (at least one); p = 1 keeps all.

    A token stays when the tokens ranked above it hold less than p (``TopPLogitsWarper``'s rule).
    The rows whose nucleus lies within the top ``TOP_P_CANDIDATES`` tokens are found there; the
    others (and small vocabularies) sort the whole row, as transformers does.
    """
    if scores.shape[-1] <= TOP_P_CANDIDATES:
        return _top_p_sorted(scores, p)
    values, indices = scores.topk(TOP_P_CANDIDATES, dim=-1)
    probs = (values - torch.logsumexp(scores, dim=-1, keepdim=True)).exp()
    above = probs.cumsum(dim=-1) - probs  # the mass of the tokens ranked above each
    keep = above < p
    keep[:, 0] = True
    out = torch.full_like(scores, _NEG_INF).scatter_(1, indices, values.masked_fill(~keep, _NEG_INF))
    out = torch.where(p >= 1.0, scores, out)
    wide = ((probs.sum(dim=-1, keepdim=True) < p) & (p < 1.0)).squeeze(1)
    if wide.any():  # a flat distribution: its nucleus reaches past the candidates
        out[wide] = _top_p_sorted(scores[wide], p[wide])
    return out


def _top_p_sorted(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    ordered, order = torch.sort(scores, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove = (cumulative <= (1 - p)) & (p < 1.0)
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), _NEG_INF)


def first_max(scores: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the first largest score: ``argmax``'s answer (ties and NaN alike), from ``max``,
    which torch's CPU kernels reduce ~4x faster over a vocabulary (8 against 2 ms for 128 x 49,152 on
    the Xeon machine, at every step of a batch)."""
    return scores.max(dim=-1).indices


class BatchSampler:
    """The next token of every row of a batch; rows live in slots ``0..B-1`` as the engine's cache keeps them.

    Per slot it keeps which tokens were seen (for the repetition penalty) and how often each was
    generated (presence and frequency penalties), allocated only once a row needs them.
    """

    def __init__(self, slots: int, vocabulary: int, device: torch.device, eos: Sequence[int] = ()):
        self.slots, self.vocabulary, self.device = slots, vocabulary, device
        self.eos = sorted(eos)  # the end-of-turn tokens a length decay raises
        self.seen: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def start_row(self, slot: int, prompt_ids: Sequence[int], decoding: RowDecoding) -> None:
        if decoding.repetition_penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(self.slots, self.vocabulary, dtype=torch.bool, device=self.device)
        if (decoding.presence_penalty or decoding.frequency_penalty) and self.counts is None:
            self.counts = torch.zeros(self.slots, self.vocabulary, dtype=torch.float32, device=self.device)
        if self.seen is not None:
            self.seen[slot] = False
            self.seen[slot, torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)] = True
        if self.counts is not None:
            self.counts[slot] = 0

    def move(self, source: int, target: int) -> None:
        for table in (self.seen, self.counts):
            if table is not None:
                table[target] = table[source]

    def record(self, tokens: torch.Tensor, slots: Sequence[int] | None = None) -> None:
        """The tokens the rows just took: row i in slot i, or in ``slots[i]``."""
        rows = torch.arange(len(tokens), device=self.device) if slots is None else torch.tensor(
            list(slots), dtype=torch.long, device=self.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1

    def next_tokens(self, logits: torch.Tensor, rows: Sequence[RowState], slots: Sequence[int] | None = None
                    ) -> torch.Tensor:
        """One token per row of ``logits`` ([rows, vocabulary]); ``slots`` says where each row's tables are
        (default: row i in slot i)."""
        scores = logits.float()
        if scores is logits:  # the controls below edit scores in place; the caller's logits stay as they were
            scores = scores.clone()
        device = scores.device
        settings = [row.decoding for row in rows]
        index = torch.arange(len(rows), device=device) if slots is None else torch.tensor(list(slots), device=device)
        penalised = [i for i, s in enumerate(settings) if s.repetition_penalty != 1.0]
        if self.seen is not None and penalised:
            chosen = torch.tensor(penalised, device=device)
            repetition_penalty_(scores, self.seen[index[chosen]],
                                _column([settings[i].repetition_penalty for i in penalised], device), chosen)
        if self.counts is not None and any(s.presence_penalty or s.frequency_penalty for s in settings):
            counts = self.counts[index]
            scores = (scores - _column([s.frequency_penalty for s in settings], device) * counts
                      - _column([s.presence_penalty for s in settings], device) * (counts > 0).float())
        for i, row in enumerate(rows):
            banned = row.banned()
            if banned:
                scores[i, banned] = _NEG_INF
        if any(s.exponential_decay_length_penalty is not None for s in settings):
            scores = length_decay(scores, rows, self.eos)
        if any(s.logit_bias for s in settings):
            bias_extremes_(logit_bias_(scores, settings), settings)
        tokens = first_max(scores)
        sampled = [i for i, s in enumerate(settings) if not s.greedy]
        if sampled:
            tokens[sampled] = self._draw(scores[sampled], [rows[i] for i in sampled])
        return tokens

    def _draw(self, scores: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
        device = scores.device
        settings = [row.decoding for row in rows]
        scores = scores / _column([s.temperature for s in settings], device)
        if any(s.top_k for s in settings):
            scores = top_k(scores, torch.tensor([s.top_k for s in settings], device=device))
        if any(s.top_p < 1.0 for s in settings):
            scores = top_p(scores, _column([s.top_p for s in settings], device))
        noise = torch.stack([row.gumbel(scores.shape[-1]) for row in rows]).to(device)
        return first_max(scores + noise)
