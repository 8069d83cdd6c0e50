"""Does a reply sound like the persona? A style judge and distances to the persona's real replies.

ROUGE against one reference reply says little about a voice. Here:
- a style judge (character and word n-gram TF-IDF + logistic regression, scikit-learn) learns the
  persona's replies against the other speakers' replies in the same conversations, from the train
  split only; its own held-out accuracy and AUC on real replies say how far to trust it;
- the persona score of a set of generated replies is the judge's mean probability that the
  persona wrote them;
- distances to the persona's real replies: reply length (Wasserstein, in words), word unigram
  Jensen-Shannon divergence, and the rates of habits chat data shows (lower-case starts, emoji,
  laughter tokens, question and exclamation marks);
- repetition: the share of replies that repeat a word 3-gram.

The style-judge stage fits the judge once per run and saves what it learned as numbers and terms
(safetensors and JSON: nothing in the files can run code); choose-decoding and evaluate build the
same scikit-learn judge from them. The evaluate stage reports all of it for base and tuned, beside
ROUGE and perplexity.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np

PERSONA, OTHER = 1, 0
# Inside the style-judge stage's output folder.
JUDGE_FILE = "judge.safetensors"  # the fitted numbers: each vectorizer's idf, the regression's weights
TERMS_FILE = "terms.json"  # each vectorizer's settings and its terms, in column order
INFO_FILE = "judge.json"
VOCABULARY_FILE = "vocabulary.json"
_WORD = re.compile(r"[a-z0-9']+")
_EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")
_LAUGH = re.compile(r"\b(?:lol+|lmao+|haha[ha]*|hehe[he]*|rofl)\b", re.IGNORECASE)


def judge_examples(rows: Iterable[dict]) -> tuple[list[str], list[int]]:
    """Replies of a split, labelled: the persona's (targets and assistant turns) vs the others' (user turns).

    A text seen in several examples (contexts overlap) counts once; one that both sides wrote is dropped.
    """
    labels: dict[str, set[int]] = {}
    for row in rows:
        labels.setdefault(row["target"].strip(), set()).add(PERSONA)
        for message in row["messages"]:
            side = {"assistant": PERSONA, "user": OTHER}.get(message["role"])
            if side is not None:
                labels.setdefault(message["content"].strip(), set()).add(side)
    kept = [(text, sides.pop()) for text, sides in labels.items() if text and len(sides) == 1]
    return [text for text, _ in kept], [label for _, label in kept]


def train_judge(texts: Sequence[str], labels: Sequence[int], seed: int) -> Any:
    """The style judge: TF-IDF over character (2-5, within words) and word (1-2) n-grams, logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    if len(set(labels)) < 2:
        raise ValueError("the style judge needs replies of the persona and of other speakers")
    min_df = 2 if len(texts) >= 200 else 1  # n-grams seen once are noise, unless there is little else
    features = make_union(
        # lowercase=False: capitalisation is part of a voice
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), lowercase=False, min_df=min_df, sublinear_tf=True),
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), token_pattern=r"[^\s]+", min_df=min_df,
                        sublinear_tf=True),
    )
    judge = make_pipeline(features, LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed))
    return judge.fit(list(texts), list(labels))


# What a fitted vectorizer's transform depends on besides its terms and idf, saved with them. Of its other
# settings, these only shape the fit; every one not named here must be scikit-learn's default, or the judge
# is refused at saving (a judge built with a callable among them could not be saved as numbers either).
_TRANSFORM_SETTINGS = ("analyzer", "ngram_range", "lowercase", "token_pattern", "strip_accents", "stop_words",
                       "preprocessor", "tokenizer", "binary", "norm", "use_idf", "smooth_idf", "sublinear_tf")
_FIT_SETTINGS = ("min_df", "max_df", "max_features")


def judge_quality(judge: Any, texts: Sequence[str], labels: Sequence[int]) -> dict:
    """Accuracy and ROC AUC of the judge on replies it was not trained on."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    probabilities = persona_probabilities(judge, texts)
    return {"replies": len(texts), "persona_share": round(float(np.mean(labels)), 4),
            "accuracy": round(float(accuracy_score(labels, probabilities >= 0.5)), 4),
            "auc": round(float(roc_auc_score(labels, probabilities)), 4) if len(set(labels)) == 2 else None}


def persona_probabilities(judge: Any, texts: Sequence[str]) -> np.ndarray:
    """The judge's probability, per reply, that the persona wrote it."""
    if not texts:
        return np.zeros(0)
    column = list(judge.classes_).index(PERSONA)
    return judge.predict_proba(list(texts))[:, column]


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def length_distance(replies: Sequence[str], reference: Sequence[str]) -> float:
    """Wasserstein distance between the reply lengths in words."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance([len(words(t)) for t in replies], [len(words(t)) for t in reference]))


def unigram_divergence(replies: Sequence[str], reference: Sequence[str]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between the word unigram distributions."""
    left, right = Counter(w for t in replies for w in words(t)), Counter(w for t in reference for w in words(t))
    if not left or not right:
        return 1.0 if left or right else 0.0
    vocabulary = sorted(set(left) | set(right))
    p = np.array([left[w] for w in vocabulary], dtype=float) / sum(left.values())
    q = np.array([right[w] for w in vocabulary], dtype=float) / sum(right.values())
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return max(0.0, (kl(p, m) + kl(q, m)) / 2)


def habit_rates(texts: Sequence[str]) -> dict[str, float]:
    """Share of replies showing each habit."""
    n = max(len(texts), 1)
    stripped = [t.strip() for t in texts]
    return {
        "lowercase_start": sum(bool(t) and t[0].isalpha() and t[0].islower() for t in stripped) / n,
        "emoji": sum(bool(_EMOJI.search(t)) for t in stripped) / n,
        "laughter": sum(bool(_LAUGH.search(t)) for t in stripped) / n,
        "question": sum("?" in t for t in stripped) / n,
        "exclamation": sum("!" in t for t in stripped) / n,
    }


def habit_distance(replies: Sequence[str], reference: Sequence[str]) -> dict[str, float]:
    """Absolute difference of each habit's rate, replies vs reference."""
    mine, theirs = habit_rates(replies), habit_rates(reference)
    return {name: round(abs(mine[name] - theirs[name]), 4) for name in mine}


def repeats_trigram(text: str) -> bool:
    tokens = words(text)
    trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
    return len(trigrams) != len(set(trigrams))


def repeated_trigram_share(texts: Sequence[str]) -> float:
    return sum(map(repeats_trigram, texts)) / len(texts) if texts else math.nan


def vocabulary(rows: Iterable[dict]) -> set[str]:
    """Every word of a split's conversations (contexts and replies): what people in this chat write."""
    found: set[str] = set()
    for row in rows:
        found.update(words(row["target"]))
        for message in row["messages"]:
            if message["role"] != "system":
                found.update(words(message["content"]))
    return found


def unknown_word_share(text: str, known: set[str]) -> float:
    """Share of a reply's words nobody in the training chats wrote: garbled words ("sorvincis") show here.

    People's own typos and names count too, so it is compared with the persona's own rate, not with 0.
    """
    tokens = words(text)
    return sum(w not in known for w in tokens) / len(tokens) if tokens else 0.0


def is_group_voice(rows: Sequence[dict]) -> bool:
    """Targets by several speakers: ``split.persona: all``, a group's voice rather than one person's."""
    return len({row.get("speaker") for row in rows}) > 1


def group_judge_examples(rows: Iterable[dict], assistant_replies: Sequence[str]) -> tuple[list[str], list[int]]:
    """For a group's voice: the chat's real replies (persona) against the base model's replies to the same
    kind of prompts (other). Every turn of the chat is the group's, so the other speakers' turns cannot
    be the contrast; what tuning must move away from is the base's assistant style."""
    labels: dict[str, set[int]] = {}
    for row in rows:
        labels.setdefault(row["target"].strip(), set()).add(PERSONA)
    for text in assistant_replies:
        labels.setdefault(text.strip(), set()).add(OTHER)
    kept = [(text, sides.pop()) for text, sides in labels.items() if text and len(sides) == 1]
    return [text for text, _ in kept], [label for _, label in kept]


def fit_judge(train_rows: Sequence[dict], seed: int, assistant_replies: Sequence[str] | None = None
              ) -> tuple[Any, dict]:
    """The style judge for a split, and what it contrasts: the other speakers' replies (one persona), or
    (a group, given ``assistant_replies``) the base model's replies to training prompts."""
    texts, labels = group_judge_examples(train_rows, assistant_replies or [])
    if assistant_replies is not None and OTHER in labels:
        contrast = "the base model's replies to training prompts (a group's voice)"
    else:  # one persona; or a base that said nothing usable (empty replies), when the speakers are all there is
        texts, labels = judge_examples(train_rows)
        contrast = "the other speakers' replies in the same conversations"
    return train_judge(texts, labels, seed), {"train_replies": len(texts), "contrast": contrast}


def save_judge(folder: Any, judge: Any, info: dict, vocabulary: set[str]) -> None:
    """The judge, what it was fitted on, and the training chats' vocabulary, into ``folder`` (made whole or not at all).

    The judge is saved as what it learned: each vectorizer's settings and terms (JSON) and its numbers
    (safetensors): the idf weights, the regression's coefficients, intercept and classes. The same judge
    gives the same bytes whatever process fits it (DVC hashes them), and loading runs no code from them.
    """
    from safetensors.numpy import save
    from sklearn.feature_extraction.text import TfidfVectorizer

    from qlora_pipeline.io import atomic_path, write_json

    (_, features), (_, regression) = judge.steps  # what train_judge builds: the union, then the regression
    if features.transformer_weights is not None:
        raise ValueError("a judge whose features are weighted cannot be saved as terms and numbers")
    vectorizers = [vectorizer for _, vectorizer in features.transformer_list]
    defaults = TfidfVectorizer().get_params()
    terms = []
    for vectorizer in vectorizers:
        params = vectorizer.get_params()
        settings = {key: params[key] for key in _TRANSFORM_SETTINGS}
        unsaved = sorted(key for key in params if key not in (*_TRANSFORM_SETTINGS, *_FIT_SETTINGS)
                         and params[key] != defaults[key])
        if unsaved or any(callable(value) for value in settings.values()):
            raise ValueError(f"a vectorizer with the settings {unsaved or settings} cannot be saved as terms "
                             "and numbers")
        terms.append({"settings": settings, "terms": vectorizer.get_feature_names_out().tolist()})
    numbers = {**{f"idf.{i}": vectorizer.idf_ for i, vectorizer in enumerate(vectorizers)},
               "coef": regression.coef_, "intercept": regression.intercept_, "classes": regression.classes_}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / JUDGE_FILE).write_bytes(save({name: np.ascontiguousarray(value) for name, value in numbers.items()}))
        write_json(tmp / TERMS_FILE, terms)
        write_json(tmp / INFO_FILE, info)
        write_json(tmp / VOCABULARY_FILE, sorted(vocabulary))


def load_judge(folder: Any) -> tuple[Any, dict, set[str]]:
    """What :func:`save_judge` wrote: the same scikit-learn judge, rebuilt from its terms and numbers."""
    from pathlib import Path

    from qlora_pipeline.errors import PipelineError
    from qlora_pipeline.io import read_json

    folder = Path(folder)
    if not (folder / JUDGE_FILE).is_file():
        raise PipelineError(f"{folder}: no style judge ({JUDGE_FILE} missing); run the style-judge stage "
                            "first (dvc repro style-judge)")
    try:
        judge = _judge_from(read_json(folder / TERMS_FILE), (folder / JUDGE_FILE).read_bytes())
        info, vocabulary = read_json(folder / INFO_FILE), set(read_json(folder / VOCABULARY_FILE))
    except Exception as err:  # damaged or foreign: unreadable, an unknown setting, numbers that do not fit the terms
        raise PipelineError(f"{folder}: {TERMS_FILE} and {JUDGE_FILE} are not a style judge this pipeline wrote "
                            f"({err}); re-run the style-judge stage (dvc repro style-judge)") from err
    return judge, info, vocabulary


def _judge_from(terms: list[dict], data: bytes) -> Any:
    """The pipeline :func:`train_judge` fits, each part given the fitted state :func:`save_judge` wrote."""
    from safetensors.numpy import load
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    numbers = load(data)
    if set(numbers) != {*(f"idf.{i}" for i in range(len(terms))), "coef", "intercept", "classes"}:
        raise ValueError(f"{len(terms)} vectorizers' terms, but the numbers {sorted(numbers)}")
    vectorizers = []
    for i, part in enumerate(terms):
        if set(part["settings"]) != set(_TRANSFORM_SETTINGS):
            raise ValueError(f"vectorizer {i} has the settings {sorted(part['settings'])}")
        vectorizer = TfidfVectorizer(**{**part["settings"], "ngram_range": tuple(part["settings"]["ngram_range"])})
        vectorizer.vocabulary_ = {term: column for column, term in enumerate(part["terms"])}
        idf = numbers[f"idf.{i}"]
        if len(vectorizer.vocabulary_) != len(part["terms"]) or idf.shape != (len(part["terms"]),):
            raise ValueError(f"vectorizer {i}: {len(part['terms'])} terms ({len(vectorizer.vocabulary_)} distinct) "
                             f"and idf weights of shape {idf.shape}")
        vectorizer.idf_ = idf
        vectorizers.append(vectorizer)
    regression = LogisticRegression()
    regression.coef_, regression.intercept_ = numbers["coef"], numbers["intercept"]
    regression.classes_ = numbers["classes"]
    width = sum(len(vectorizer.vocabulary_) for vectorizer in vectorizers)
    if regression.coef_.shape != (1, width) or regression.intercept_.shape != (1,):
        raise ValueError(f"regression weights of shape {regression.coef_.shape} for {width} terms")
    if sorted(regression.classes_.tolist()) != [OTHER, PERSONA]:
        raise ValueError(f"classes {regression.classes_.tolist()}, not {[OTHER, PERSONA]}")
    regression.n_features_in_ = width
    judge = make_pipeline(make_union(*vectorizers), regression)
    judge.predict_proba(["a reply"])  # settings scikit-learn refuses (an analyzer, a norm) fail here, not in a stage
    return judge
