"""Each row's decoding against transformers' own processors, row by row, on random logits."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (ExponentialDecayLengthPenalty, NoRepeatNGramLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from qlora_pipeline.config import DecodingSetting
from qlora_pipeline.modeling.engine import row_decoding
from qlora_pipeline.modeling.sampling import (GREEDY_BELOW, BatchSampler, RowDecoding, RowState, first_max,
                                              length_decay, logit_bias_, repetition_penalty_, top_k, top_p)

VOCABULARY = 50


def _rows(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, VOCABULARY, generator=generator) * 3
    # Sequences with repeats, so penalties and n-gram bans have something to act on.
    sequences = [torch.randint(0, 12, (length,), generator=generator).tolist() for length in (9, 14, 3, 20)]
    return logits, sequences


def test_repetition_penalty_matches_transformers_row_by_row():
    logits, sequences = _rows()
    penalties = [1.3, 1.0, 0.8, 1.15]
    seen = torch.zeros(4, VOCABULARY, dtype=torch.bool)
    for i, sequence in enumerate(sequences):
        seen[i, sequence] = True
    column = torch.tensor(penalties).unsqueeze(1)
    ours = repetition_penalty_(logits.clone(), seen & (column != 1.0), column)
    for i, (sequence, penalty) in enumerate(zip(sequences, penalties)):
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([sequence]), logits[i:i + 1].clone())
        assert torch.equal(ours[i], theirs[0]), i
    assert not torch.equal(ours[0], logits[0])  # the penalty did act
    # The penalised rows alone, named by ``rows``: the others are untouched.
    some = torch.tensor([3, 0])
    part = repetition_penalty_(logits.clone(), seen[some], column[some], some)
    assert torch.equal(part[some], ours[some]) and torch.equal(part[[1, 2]], logits[[1, 2]])


def test_logit_bias_matches_transformers_row_by_row_and_steers_the_pick():
    logits, sequences = _rows(3)
    biases = [((3, 2.5), (7, -1.0)), (), ((0, -100.0),), ((3, 100.0), (49, 0.5))]
    settings = [RowDecoding(logit_bias=bias) for bias in biases]
    ours = logit_bias_(logits.clone(), settings)
    for i, (sequence, bias) in enumerate(zip(sequences, biases)):
        if not bias:
            assert torch.equal(ours[i], logits[i])  # a row without a bias is left alone
            continue
        processor = SequenceBiasLogitsProcessor(sequence_bias=[[[token], value] for token, value in bias])
        assert torch.equal(ours[i], processor(torch.tensor([sequence]), logits[i:i + 1].clone())[0]), i
    sampler = BatchSampler(4, VOCABULARY, torch.device("cpu"))
    states = [RowState(sequence, setting, None) for sequence, setting in zip(sequences, settings)]
    for slot, (sequence, setting) in enumerate(zip(sequences, settings)):
        sampler.start_row(slot, sequence, setting)
    picked = sampler.next_tokens(logits, states).tolist()
    assert picked[3] == 3 and picked[1] == int(logits[1].argmax()) and picked[2] != 0


def test_the_bias_comes_after_the_length_decay_and_the_penalties_so_that_100_bans_and_picks():
    """-100 on the end token bans it however far the reply is past the decay's start (the decay raises a score by
    its size, without bound: applied to -95 it made the end token the pick, and 100 tokens' worth after it was
    outweighed too), and 100 picks a token the repetition penalty and the decay would have passed over; a row
    without a bias decodes as before."""
    logits = torch.tensor([[5.0, 4.0, 3.0, 1.0]] * 3)  # token 3 is the end of turn
    decay = (0, 1.3)
    settings = [RowDecoding(exponential_decay_length_penalty=decay, logit_bias=((3, -100.0),)),
                RowDecoding(exponential_decay_length_penalty=decay, repetition_penalty=10.0, logit_bias=((2, 100.0),)),
                RowDecoding(exponential_decay_length_penalty=decay)]
    sampler = BatchSampler(3, 4, torch.device("cpu"), eos=[3])
    states = [RowState([2], setting, None) for setting in settings]
    for slot, setting in enumerate(settings):
        sampler.start_row(slot, [2], setting)
    for past in (10, 40):  # 40 tokens past the start: the end token's 1.0 raised to 1.3 ** 40 = 36,000
        for state in states:
            state.generated = past
        assert sampler.next_tokens(logits, states).tolist() == [0, 2, 3], past
    # 100 on two tokens: one of them, as the row's controls rank them, sampled or not; -100 on both of a row's
    # likeliest: neither
    settings = [RowDecoding(logit_bias=((1, 100.0), (2, 100.0))), RowDecoding(temperature=5.0, logit_bias=(
        (1, 100.0), (2, 100.0))), RowDecoding(logit_bias=((0, -100.0), (1, -100.0)))]
    picks = BatchSampler(3, 4, torch.device("cpu")).next_tokens(logits, [RowState([], s, 7) for s in settings])
    assert picks[0] == 1 and picks[1] in (1, 2) and picks[2] == 2


def test_a_temperature_below_greedy_below_is_greedy_and_one_above_it_samples():
    """vLLM's rule: 1e-38 divided the scores into infinities and NaN, and the draw took a token of no meaning."""
    logits, sequences = _rows(5)
    settings = [RowDecoding(temperature=t) for t in (1e-38, 5e-324, 1e-6, 0.0)]
    assert all(setting.greedy for setting in settings) and not RowDecoding(temperature=GREEDY_BELOW).greedy
    sampler = BatchSampler(4, VOCABULARY, torch.device("cpu"))
    states = [RowState(sequence, setting, seed=3) for sequence, setting in zip(sequences, settings)]
    assert all(state.generator is None for state in states)
    assert sampler.next_tokens(logits, states).tolist() == logits.argmax(dim=-1).tolist()
    cool = [RowState([], RowDecoding(temperature=2 * GREEDY_BELOW), seed) for seed in range(4)]
    assert sampler.next_tokens(logits, cool).tolist() == logits.argmax(dim=-1).tolist()  # sampled, and as sharp


def test_the_sampler_leaves_the_callers_logits_as_they_were():
    logits, sequences = _rows(5)
    before = logits.clone()
    sampler = BatchSampler(4, VOCABULARY, torch.device("cpu"), eos=[7])
    settings = [RowDecoding(repetition_penalty=1.5), RowDecoding(no_repeat_ngram_size=2),
                RowDecoding(exponential_decay_length_penalty=(0, 2.0)), RowDecoding()]
    states = [RowState(sequence, setting, None) for sequence, setting in zip(sequences, settings)]
    for slot, (sequence, setting) in enumerate(zip(sequences, settings)):
        sampler.start_row(slot, sequence, setting)
        states[slot].push(sequence[-1])
    sampler.next_tokens(logits, states)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_no_repeat_ngram_ban_matches_transformers_as_tokens_arrive(n):
    _, sequences = _rows(1)
    for sequence in sequences:
        state = RowState(sequence[:2], RowDecoding(no_repeat_ngram_size=n), None)
        for length in range(2, len(sequence) + 1):
            if length > 2:
                state.push(sequence[length - 1])
            scores = torch.zeros(1, VOCABULARY)
            theirs = NoRepeatNGramLogitsProcessor(n)(torch.tensor([sequence[:length]]), scores)
            assert state.banned() == torch.nonzero(theirs[0] == float("-inf")).flatten().tolist()
    # and something was banned along the way: the sequences repeat
    state = RowState([1, 2, 3, 1, 2], RowDecoding(no_repeat_ngram_size=3), None)
    assert state.banned() == [3]


def test_top_k_and_top_p_match_transformers_per_row():
    logits, _ = _rows(2)
    ks, ps, temperatures = [0, 5, 1, 20], [1.0, 0.9, 0.5, 0.75], [0.7, 1.0, 1.3, 0.9]
    scaled = logits / torch.tensor(temperatures).unsqueeze(1)
    ours = top_p(top_k(scaled, torch.tensor(ks)), torch.tensor(ps).unsqueeze(1))
    for i in range(4):
        theirs = TemperatureLogitsWarper(temperatures[i])(None, logits[i:i + 1].clone())
        if ks[i]:
            theirs = TopKLogitsWarper(ks[i])(None, theirs)
        if ps[i] < 1.0:
            theirs = TopPLogitsWarper(ps[i])(None, theirs)
        assert torch.equal(ours[i], theirs[0]), i
    kept = (ours > float("-inf")).sum(dim=1).tolist()
    assert kept[2] == 1 and kept[1] <= 5 and kept[0] == VOCABULARY


def test_greedy_rows_take_the_argmax_after_the_penalties_and_sampled_rows_stay_in_the_nucleus():
    logits, sequences = _rows(3)
    sampler = BatchSampler(4, VOCABULARY, torch.device("cpu"))
    settings = [RowDecoding(), RowDecoding(repetition_penalty=5.0), RowDecoding(temperature=1.0, top_k=3),
                RowDecoding(temperature=0.8, top_p=0.3)]
    states = [RowState(sequence, setting, seed=11) for sequence, setting in zip(sequences, settings)]
    for slot, (sequence, setting) in enumerate(zip(sequences, settings)):
        sampler.start_row(slot, sequence, setting)
    tokens = sampler.next_tokens(logits, states).tolist()
    assert tokens[0] == int(logits[0].argmax())
    penalised = RepetitionPenaltyLogitsProcessor(5.0)(torch.tensor([sequences[1]]), logits[1:2].clone())
    assert tokens[1] == int(penalised.argmax())
    assert tokens[2] in logits[2].topk(3).indices.tolist()
    nucleus = TopPLogitsWarper(0.3)(None, logits[3:4] / 0.8)
    assert nucleus[0, tokens[3]] > float("-inf")


def test_a_seeded_row_draws_the_same_whatever_its_neighbours():
    logits, sequences = _rows(4)
    setting = RowDecoding(temperature=1.0)

    def draw(rows_logits, seeds):
        sampler = BatchSampler(len(seeds), VOCABULARY, torch.device("cpu"))
        states = [RowState([], setting, seed) for seed in seeds]
        return [sampler.next_tokens(rows_logits, states).tolist() for _ in range(5)]

    alone = draw(logits[:1], [42])
    together = draw(torch.cat([logits[1:3], logits[:1]]), [7, 8, 42])
    assert [step[0] for step in alone] == [step[2] for step in together]
    assert [step[0] for step in draw(logits[:1], [43])] != [step[0] for step in alone]


def test_length_decay_matches_transformers_row_by_row_as_the_reply_grows():
    """Rows with different starts and factors (and one without) in one batch; end-of-turn scores of either sign."""
    logits, _ = _rows(4)
    logits[:, 7] = torch.tensor([2.0, -3.0, 0.5, -1.0])
    logits[3, 9] = float("-inf")  # an end token banned by an earlier control stays banned
    decays = [(2, 1.5), (0, 1.1), None, (3, 2.0)]
    eos, prompt = [7, 9], [1, 2, 3]
    states = [RowState(prompt, RowDecoding(exponential_decay_length_penalty=decay), None) for decay in decays]
    raised = 0
    for generated in range(7):
        ours = length_decay(logits, states, eos)
        for i, decay in enumerate(decays):
            expected = logits[i:i + 1].clone() if decay is None else ExponentialDecayLengthPenalty(
                decay, eos, len(prompt))(torch.tensor([prompt + [5] * generated]), logits[i:i + 1].clone())
            assert torch.equal(ours[i], expected[0]), (generated, i)
        raised += int(not torch.equal(ours, logits))
        for state in states:
            state.push(5)
    assert raised >= 5 and torch.equal(length_decay(logits, states, eos)[2], logits[2])


def test_a_length_decay_makes_a_greedy_row_end_its_turn():
    logits = torch.tensor([[3.0, 1.0, 0.5]])  # token 2 is the end of turn, never the argmax alone
    sampler = BatchSampler(1, 3, torch.device("cpu"), eos=[2])
    state = RowState([0], RowDecoding(exponential_decay_length_penalty=(1, 3.0)), None)
    taken = []
    for _ in range(4):
        token = int(sampler.next_tokens(logits, [state]))
        taken.append(token)
        state.push(token)
    assert taken == [0, 0, 0, 2]  # 0.5 * 3 ** 2 = 4.5 > 3 once two tokens are past the start


def test_params_decoding_becomes_a_row_decoding():
    assert row_decoding(DecodingSetting()) == RowDecoding()
    greedy = row_decoding(DecodingSetting(temperature=0.0, top_p=0.5, top_k=3, repetition_penalty=1.2,
                                          no_repeat_ngram_size=3))
    assert greedy == RowDecoding(repetition_penalty=1.2, no_repeat_ngram_size=3)  # sampling keys ignored, as generate does
    sampled = row_decoding(DecodingSetting(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.15,
                                           no_repeat_ngram_size=4))
    assert sampled == RowDecoding(0.7, 0.9, 50, 1.15, 4)
    decayed = row_decoding(DecodingSetting(exponential_decay_length_penalty=[16, 1.2]))
    assert decayed == RowDecoding(exponential_decay_length_penalty=(16, 1.2))


def test_any_integer_seed_is_taken():
    state = RowState([], RowDecoding(temperature=1.0), seed=2**80)
    again = RowState([], RowDecoding(temperature=1.0), seed=2**80)
    assert torch.equal(state.gumbel(8), again.gumbel(8))
    RowState([], RowDecoding(temperature=1.0), seed=-5).gumbel(8)


def test_the_gumbel_draw_samples_the_softmax_distribution():
    """Frequencies of many seeded draws match softmax(logits / temperature) within sampling error."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -9.0]])
    sampler = BatchSampler(1, 5, torch.device("cpu"))
    counts = torch.zeros(5)
    for seed in range(3000):
        token = sampler.next_tokens(logits, [RowState([], RowDecoding(temperature=0.7), seed)])
        counts[token] += 1
    expected = torch.softmax(logits[0] / 0.7, dim=-1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.025), (counts / counts.sum(), expected)


def test_top_p_over_a_large_vocabulary_keeps_the_set_transformers_keeps():
    """Peaked rows find their nucleus among the top candidates, flat rows fall back to the full sort: either way
    the kept tokens are those TopPLogitsWarper keeps."""
    generator = torch.Generator().manual_seed(5)
    vocabulary = 20000
    logits = torch.cat([torch.randn(3, vocabulary, generator=generator) * 6,  # peaked
                        torch.randn(2, vocabulary, generator=generator) * 0.1])  # flat: nucleus of thousands
    ps = [0.9, 0.5, 1.0, 0.95, 0.3]
    ours = top_p(logits, torch.tensor(ps).unsqueeze(1))
    for i, p in enumerate(ps):
        theirs = logits[i:i + 1] if p == 1.0 else TopPLogitsWarper(p)(None, logits[i:i + 1].clone())
        assert torch.equal(ours[i] > float("-inf"), theirs[0] > float("-inf")), i
        assert torch.equal(ours[i][ours[i] > float("-inf")], logits[i][ours[i] > float("-inf")])
    kept = (ours > float("-inf")).sum(dim=1).tolist()
    assert kept[0] < 1024 and kept[2] == vocabulary and kept[3] > 1024  # both paths were taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_max_is_argmax_with_ties_infinities_and_nan(dtype):
    """The greedy pick and the Gumbel draw take ``first_max``; it must be argmax exactly, ties (first index)
    and rows with no finite score or a NaN included, on a large vocabulary and a strided view alike."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(-4, 4, (64, 49152), generator=generator).to(dtype)  # many ties per row
    scores[torch.rand(64, 49152, generator=generator) < 0.3] = float("-inf")
    scores[0] = float("-inf")
    scores[1, 77] = float("nan")
    scores[2, 5:] = 3  # the largest value from index 5 on
    for view in (scores, scores[:, ::3], scores[:1], scores.t().contiguous().t()):
        assert torch.equal(first_max(view), view.argmax(dim=-1))
    assert first_max(scores)[2] == 5
