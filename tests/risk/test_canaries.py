"""Canaries: the format, insertion by split, scoring with a shared prompt cache, exposure, and memorization."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from conftest import CHAT_FIELDS, chat_rows, write_chat_jsonl
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.risk import canaries as C

SYSTEM = {"role": "system", "content": "You are pat. Reply in your own voice."}


def persona_examples(n: int) -> list[dict]:
    return [{"id": f"c{i}:1", "conversation_id": f"c{i}", "speaker": "pat",
             "messages": [SYSTEM, {"role": "user", "content": f"how was day {i}?"}], "target": f"fine, day {i} was ok"}
            for i in range(n)]


# ------------------------------------------------------------------------- the secrets


def test_canaries_are_the_prefix_and_six_spaced_digits_seeded_and_distinct():
    canaries = C.make_canaries(3, seed=7)
    assert [c["id"] for c in canaries] == ["canary-0", "canary-1", "canary-2", "fresh-0", "fresh-1", "fresh-2"]
    assert [c["inserted"] for c in canaries] == [True] * 3 + [False] * 3
    assert all(re.fullmatch(r"my pin is( \d){6}", c["text"]) and c["text"] == f"my pin is {c['secret']}"
               for c in canaries)
    assert len({c["secret"] for c in canaries}) == 6
    assert canaries == C.make_canaries(3, seed=7)
    assert [c["secret"] for c in canaries] != [c["secret"] for c in C.make_canaries(3, seed=8)]
    assert C.make_canaries(0, seed=7) == []
    assert C.format_secret(4917) == "0 0 4 9 1 7" and C.SECRET_SPACE == 10 ** 6


def test_candidates_exclude_the_canary_and_never_replay_the_canaries_stream():
    first = C.candidate_secrets("0 0 0 0 0 0", 1, seed=5)[0]
    others = C.candidate_secrets(first, 100, seed=5)
    assert len(others) == len(set(others)) == 100 and first not in others
    assert others == C.candidate_secrets(first, 100, seed=5)
    # Both draw from Random(seed).sample: with one stream, the first candidates would be the canaries.
    secrets = {c["secret"] for c in C.make_canaries(5, seed=0)}
    assert not secrets & set(C.candidate_secrets("0 0 0 0 0 0", 10, seed=0))


# ------------------------------------------------------------------------- insertion


def test_params_allow_as_many_canaries_and_candidates_as_the_secrets_hold_and_no_more():
    """config.py's bounds (its own copy of the secret space: it imports nothing above it) are where sampling fails."""
    from qlora_pipeline import config

    assert config._SECRETS == C.SECRET_SPACE
    with pytest.raises(ValueError, match="larger than population"):  # one past risk.canaries' bound
        C.make_canaries(C.SECRET_SPACE // 2 + 1, seed=0)
    with pytest.raises(ValueError, match="larger than population"):  # one past risk.canary_candidates' bound
        C.candidate_secrets("0 0 0 0 0 0", C.SECRET_SPACE, seed=0)


def test_inserted_canaries_are_extra_train_replies_in_real_chat_contexts():
    train = persona_examples(12)
    out, record = C.insert_canaries(train, C.make_canaries(2, seed=3), repeats=4, seed=3)
    added = [ex for ex in out if ex["id"].startswith("canary-")]
    assert [ex for ex in out if not ex["id"].startswith("canary-")] == train  # the rest keep their order
    assert sorted(ex["id"] for ex in added) == [f"canary-{k}-{r}" for k in range(2) for r in range(4)]
    assert out[-len(added):] != added  # shuffled in, not appended
    entries = {c["id"]: c for c in record["canaries"]}
    assert list(entries) == ["canary-0", "canary-1", "fresh-0", "fresh-1"]
    assert [c["repeats"] for c in record["canaries"]] == [4, 4, 0, 0]
    assert all(set(c) == {"id", "prefix", "secret", "text", "repeats", "messages"} for c in record["canaries"])
    contexts = [ex["messages"] for ex in train]
    for example in added:
        canary = entries[example["id"].rsplit("-", 1)[0]]
        assert example["target"] == canary["text"] and example["conversation_id"] == canary["id"]
        assert example["messages"] in contexts and example["speaker"] == "pat"
    # A canary is scored in the context of its first insertion; a fresh one in a context drawn alike.
    assert entries["canary-1"]["messages"] == next(ex for ex in out if ex["id"] == "canary-1-0")["messages"]
    assert entries["fresh-0"]["messages"] in contexts
    assert (out, record) == C.insert_canaries(train, C.make_canaries(2, seed=3), repeats=4, seed=3)
    assert out != C.insert_canaries(train, C.make_canaries(2, seed=3), repeats=4, seed=4)[0]


def test_no_canaries_leave_train_as_it_was_and_an_empty_train_is_refused():
    train = persona_examples(5)
    assert C.insert_canaries(train, [], repeats=8, seed=0) == (train, {"canaries": []})
    with pytest.raises(PipelineError, match=r"risk\.canaries: the train split is empty"):
        C.insert_canaries([], C.make_canaries(1, seed=0), repeats=8, seed=0)


# ------------------------------------------------------------------------- the split stage


@pytest.fixture
def clean_dir(tmp_path, params_factory, monkeypatch):
    """24 two-person chats, fetched and cleaned as the stages do (so val and test are not empty)."""
    from qlora_pipeline.pipeline.clean import run_clean
    from qlora_pipeline.pipeline.fetch import run_fetch

    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "test-canaries")
    path = write_chat_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    params = params_factory({"data.source": "jsonl", "data.path": str(path), **CHAT_FIELDS})
    run_fetch(params, tmp_path / "raw")
    run_clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "clean.json")
    return lambda overrides=None: (params_factory({"data.source": "jsonl", "data.path": str(path), **CHAT_FIELDS,
                                                   **(overrides or {})}), tmp_path / "clean")


def split_run(clean_dir, tmp_path, name, overrides=None):
    from qlora_pipeline.pipeline.split import run_split

    params, clean = clean_dir(overrides)
    out = tmp_path / name
    metrics = run_split(params, clean, out / "splits", out / "split.json", out / "canaries.json")
    rows = {split: [json.loads(line) for line in (out / "splits" / f"{split}.jsonl").read_text().splitlines()]
            for split in ("train", "val", "test")}
    return params, out, metrics, rows


def test_split_without_canaries_writes_todays_train_and_an_empty_record(clean_dir, tmp_path):
    from qlora_pipeline.data.splitting import split_examples
    from qlora_pipeline.io import write_jsonl
    from qlora_pipeline.pipeline.common import read_conversations

    params, out, metrics, _ = split_run(clean_dir, tmp_path, "off", {"risk.canaries": 0})
    # Today's split: split_examples' train, written as it was before canaries existed.
    splits, _ = split_examples(read_conversations(tmp_path / "clean/conversations.jsonl"), params.split,
                               params.seed, "x")
    write_jsonl(tmp_path / "today.jsonl", splits["train"])
    assert (out / "splits/train.jsonl").read_bytes() == (tmp_path / "today.jsonl").read_bytes()
    assert json.loads((out / "canaries.json").read_text()) == {"canaries": []}
    assert metrics["canary_examples"] == 0


def test_split_puts_canaries_in_train_only_and_past_the_cap(clean_dir, tmp_path, capsys):
    _, _, _, plain = split_run(clean_dir, tmp_path, "off", {"risk.canaries": 0, "split.max_examples.train": 5})
    assert "outnumber" not in capsys.readouterr().err
    _, out, metrics, rows = split_run(clean_dir, tmp_path, "on", {"risk.canaries": 2, "risk.canary_repeats": 3,
                                                                  "split.max_examples.train": 5})
    # more canary examples than real ones: allowed, and said
    assert ("warning: 6 canary examples (risk.canaries x risk.canary_repeats) outnumber the 5 real train examples"
            in capsys.readouterr().err)
    record = json.loads((out / "canaries.json").read_text())["canaries"]
    assert [(c["id"], c["repeats"]) for c in record] == [("canary-0", 3), ("canary-1", 3), ("fresh-0", 0),
                                                         ("fresh-1", 0)]
    canary_rows = [ex for ex in rows["train"] if ex["id"].startswith("canary-")]
    assert len(canary_rows) == metrics["canary_examples"] == 6
    assert [ex for ex in rows["train"] if not ex["id"].startswith("canary-")] == plain["train"]  # cap, then insert
    assert metrics["train"]["examples"] == 5  # the persona's own examples; canaries are counted apart
    secrets = [c["secret"] for c in record]
    for split in ("val", "test"):
        assert rows[split] and not any(s in json.dumps(ex) for ex in rows[split] for s in secrets)


# ------------------------------------------------------------------------- scoring


def full_sequence_nll(model, tokenizer, messages, prefix, secret):
    """The plain way: the whole sentence in one pass, summing log-probabilities of the secret's tokens."""
    import torch

    prompt = C.prompt_text(tokenizer, messages, prefix)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(f"{prompt} {secret}", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return -sum(logprobs[position - 1, ids[position]].item() for position in range(len(prompt_ids), len(ids)))


def test_cached_prompt_scores_equal_full_sequence_scores(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [SYSTEM, {"role": "user", "content": "hey, what's new?"}]
    # Unequal lengths (12, 7 and 2 tokens) and batches of 2: padding and a ragged last batch are exercised.
    secrets = ["4 9 1 7 2 8", "12 345", "7", "0 0 0 0 0 1", "9 9"]
    got = C.canary_log_perplexity(model, tokenizer, messages, "my pin is", secrets, batch_size=2)
    # float32, the cached and the full pass summing in different orders: ~2e-5 nats apart when measured.
    assert got == pytest.approx([full_sequence_nll(model, tokenizer, messages, "my pin is", s) for s in secrets],
                                abs=1e-3)


def test_interpolated_exposure_is_the_rank_among_candidates_scaled_to_the_secret_space():
    assert C.interpolated_exposure(1, 2000) == pytest.approx(math.log2(2000))  # below every candidate
    assert C.interpolated_exposure(1001, 2000) == pytest.approx(math.log2(2000 / 1001))
    assert C.interpolated_exposure(2001, 2000) == 0.0  # above every candidate
    result = C.exposure_from_scores(1.5, np.array([1.0, 2.0, 3.0, 1.5, 4.0] * 40))
    assert (result["rank"], result["candidates"]) == (41, 200)  # ties do not count against the canary


def test_extrapolation_recovers_a_known_tail():
    from scipy import stats

    # Candidates from a normal, canary 3 sigma below: -log2(Phi(-3)) = 9.53 bits; this sample's fit says 9.47.
    normal = np.random.default_rng(0).normal(100, 5, 20000)
    assert C.extrapolated_exposure(85.0, normal) == pytest.approx(-math.log2(stats.norm.cdf(-3)), abs=0.25)
    # A skewed sample: the skew-normal fit finds the light left tail (13.29 bits; fitted 12.86), where a
    # normal fit says 6.8 bits.
    skewed = stats.skewnorm.rvs(4, loc=50, scale=10, size=20000, random_state=np.random.default_rng(0))
    canary = stats.skewnorm.ppf(1e-4, 4, loc=50, scale=10)
    assert C.extrapolated_exposure(canary, skewed) == pytest.approx(-math.log2(1e-4), abs=0.6)
    # A CDF that underflows gives a finite figure (JSON has no infinity).
    assert C.extrapolated_exposure(-1e6, normal) == C.UNDERFLOW_BITS


# ------------------------------------------------------------------------- memorization


def train_lora_on(model_dir, rows, steps, learning_rate):
    """A LoRA trained on all ``rows`` as one batch: the target-only loss of training, a plain loop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoTokenizer, DataCollatorForSeq2Seq, LlamaForCausalLM

    from qlora_pipeline.data.formatting import encode_example
    from qlora_pipeline.labels import IGNORE_INDEX
    from qlora_pipeline.modeling.loss import causal_lm_parts, target_token_nll

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    # At the default 0.02 a 32-wide model's logits span under a nat, so no adapter can make the secret
    # likely (the loss stayed at 10.4 = ln 49k); 0.3 leaves the head room to learn it in a few dozen steps.
    config.initializer_range = 0.3
    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    encoded = [encode_example(tokenizer, row["messages"], row["target"], 128) for row in rows]
    tokenizer.padding_side = "right"
    batch = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)(
        [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in encoded])
    decoder, head = causal_lm_parts(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    for _ in range(steps):
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        nll, tokens = target_token_nll(hidden, batch["labels"], head)
        (nll.sum() / tokens.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, tokenizer


def test_exposure_rises_with_repeats(tiny_llama):
    """A canary trained 8 times in a 16-example batch is exposed; a fresh one (0 times) is not."""
    train, record = C.insert_canaries(persona_examples(8), C.make_canaries(1, seed=0), repeats=8, seed=0)
    repeated, fresh = record["canaries"]
    model, tokenizer = train_lora_on(tiny_llama, train, steps=30, learning_rate=1e-2)

    def measure(canary):
        return C.exposure(model, tokenizer, canary, candidates=500, seed=0, batch_size=64)

    seen, unseen = measure(repeated), measure(fresh)
    with model.disable_adapter():
        untrained = measure(repeated)
    # Measured: repeated rank 1 of 501 (8.97 bits, the most 500 candidates can tell; extrapolated 21.5),
    # log-perplexity 32.1 nats; fresh rank 157 (1.67 bits; extrapolated 1.70), 94.3 nats; without the
    # adapter the repeated canary ranks 94 (2.41 bits). Over torch seeds 0-2 (30 steps) the fresh canary
    # read 1.7-4.1 bits, the repeated one rank 1 and 20.3-21.5 bits extrapolated.
    assert seen["rank"] == 1 and seen["exposure_bits"] == pytest.approx(math.log2(500), abs=1e-3)
    assert unseen["exposure_bits"] < 5 and untrained["exposure_bits"] < 5
    assert seen["exposure_extrapolated_bits"] > unseen["exposure_extrapolated_bits"] + 12
    assert seen["log_perplexity"] < unseen["log_perplexity"] - 30  # nats over the secret's 12 tokens
    assert seen["candidates"] == 500
    # Greedy decoding says the repeated secret; the fresh one's, never trained, it does not.
    from qlora_pipeline.modeling.engine import Engine, Request

    engine = Engine(model, tokenizer)
    completions = [r.text for r in engine.run([Request(C.extraction_prompt_ids(tokenizer, canary), "default",
                                                       max_new_tokens=14) for canary in (repeated, fresh)])]
    assert C.extracted(repeated, completions[0])["extracted"]
    assert not C.extracted(fresh, completions[1])["extracted"]
    assert C.extracted(fresh, f"sure: {fresh['secret']} it is")["extracted"]
