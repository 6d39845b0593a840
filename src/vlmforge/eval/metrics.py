"""Scoring rules of the standard VLM benchmarks, each as the community's harnesses compute it.

Published scores are computed by lmms-eval and VLMEvalKit; scores that differ from papers come
mostly from answer normalisation and parsing, so every rule here reproduces a reference
implementation, quirks included, and names it in its docstring. `METRICS_VERSION` is written into
every report; it changes whenever a rule here changes.

- `normalize_answer`, `vqa_accuracy`: VQAv2 / TextVQA (EvalAI answer processor; lmms-eval tasks
  `vqav2`, `textvqa`).
- `anls`: DocVQA / InfographicVQA (lmms-eval `anls`, threshold 0.5).
- `parse_multi_choice`, `mmstar_match`: MMMU / MMBench-style letter extraction (the MMMU
  repository's parser, as lmms-eval uses it) and MMStar's own matcher.
- `parse_open_response`, `open_answer_correct`: MMMU open questions.
- `yes_no`, `pope_scores`: POPE (LLaVA's `eval_pope.py` reading of free text; lmms-eval's
  precision / recall / F1).
- `cider_d`: CIDEr-D for captions (coco-caption's `CiderScorer`), pure Python.
- `exact_match`, `relaxed_accuracy`: exact match after normalisation; ChartQA's relaxed accuracy.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict

METRICS_VERSION = "1"

# ---------------------------------------------------------------------------------------------
# VQA answer processing: EvalAI's processor (facebookresearch/mmf pythia/tasks/processors.py),
# the one lmms-eval's `vqa_eval_metric.EvalAIAnswerProcessor` copies.

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The reference's lookbehind is misspelled as `(?!<=\d)`; kept, since it decides real scores.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def process_punctuation(text: str) -> str:
    """EvalAI: punctuation next to a space (or any, when a digit-comma-digit occurs) is dropped,
    other punctuation becomes a space; periods not followed by a digit are dropped."""
    out = text
    drop_all = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if drop_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """EvalAI: number words to digits, articles dropped, contractions restored."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The whole EvalAI processor: lowercase, commas and '?' removed, "'s" split, whitespace,
    punctuation, digits, articles, contractions ("Two" -> "2", "the cat." -> "cat", "1,000" -> "1000")."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def vqa_accuracy(prediction: str, answers: list[str], references: str = "normalize") -> float:
    """VQA accuracy: min(#other humans who gave the answer / 3, 1), averaged over the 10
    leave-one-out subsets of the human answers.

    The prediction always goes through `normalize_answer`. `references` says how the human answers
    are treated, as in the two lmms-eval tasks:
    - `normalize` (TextVQA, `textvqa_process_results`): every answer through `normalize_answer`;
    - `if_differ` (VQAv2, `vqav2_process_results` after the official vqaEval.py): answers are only
      stripped, and punctuation / digit / article processing is applied to them and again to the
      prediction only when the answers are not all the same string.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    if references == "normalize":
        refs = [normalize_answer(a) for a in answers]
    elif references == "if_differ":
        refs = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        if len(set(refs)) > 1:
            refs = [process_digit_article(process_punctuation(a)) for a in refs]
            pred = process_digit_article(process_punctuation(pred))
    else:
        raise ValueError(f"references must be 'normalize' or 'if_differ', not {references!r}")
    scores = [min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))]
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------
# ANLS


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question (Biten et al. 2019, DocVQA), as
    lmms-eval's `anls`: both sides lowercased with whitespace collapsed, distance divided by the
    longer of the *raw* strings, 1 - the smallest normalised distance over the answers, and 0 when
    that is below `threshold`."""
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    det = " ".join(prediction.strip().lower().split())
    values = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1 - min(values)
    return 0.0 if score < threshold else score


# ---------------------------------------------------------------------------------------------
# Multiple choice


def option_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def parse_multi_choice(response: str, options: list[str], seed: int | None = None) -> str | None:
    """The option letter a free-text answer picks, by the MMMU repository's `parse_multi_choice_response`
    (eval/eval_utils.py; what lmms-eval's MMMU task calls), in its order: "(A)", then "A " , then
    "A.", then (for answers longer than 5 words) the option's text; several candidates -> the one
    that occurs last.

    Where nothing matches, the reference picks a letter at random; here the answer is `None`
    (scored wrong) unless `seed` is given, in which case a letter is drawn from a generator seeded
    with `seed` and the response (so reruns agree) and the report must say so.
    """
    letters = option_letters(len(options))
    index2ans = dict(zip(letters, options))
    for ch in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(ch)
    response = " " + response + " "
    index_ans, with_brackets, candidates = True, False, []
    for c in letters:
        if f"({c})" in response:
            candidates.append(c)
            with_brackets = True
    if not candidates:
        candidates = [c for c in letters if f"{c} " in response]
    if not candidates:
        candidates = [c for c in letters if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, ans in index2ans.items() if ans.lower() in response.lower()]
        index_ans = not candidates
    if not candidates:
        return None if seed is None else random.Random(f"{seed}:{response}").choice(letters)
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:
        starts = [response.rfind(f"({c})" if with_brackets else f" {c} ") for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[starts.index(max(starts))]


def mmstar_match(prediction: str, answer: str) -> bool:
    """MMStar's own matcher (lmms-eval `mmstar.utils.exact_match`): the first character of the
    answer, or the one after "(", "option " or "the answer is "."""
    gt = answer.lower().strip().replace("\n", " ")
    p = prediction.lower().strip().replace("\n", " ")
    try:
        if gt == p[0]:
            return True
        if p[0] == "(":
            return gt == p[1]
        if p[0:7] == "option ":
            return gt == p[7]
        if p[0:14] == "the answer is ":
            return gt == p[14]
    except IndexError:
        return False
    return False


_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def _normalize_open(s: str) -> list:
    s = s.strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        s = s.lower()
        return [" " + s, s + " "] if len(s) == 1 else [s]


def parse_open_response(response: str) -> list:
    """MMMU open questions (`parse_open_response`, MMMU eval/eval_utils.py): the tail after the last
    key phrase ("so", "is", "therefore", "answer", ... and "=" in the last sentence) of each
    sentence, plus every number in it, normalised (numbers to floats rounded to 2 places)."""
    keys = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    text = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", text)
    key_responses = []
    for i, sent in enumerate(sentences):
        indicators = keys + (["="] if i == len(sentences) - 1 else [])
        tails = [sent.split(k)[-1].strip() for k in indicators if k in sent]
        if tails:
            shortest = min(tails, key=len)
            if shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
                key_responses.append(shortest)
    key_responses = key_responses or [text]
    preds = list(key_responses)
    for r in key_responses:
        preds += _NUM_COMMAS.findall(r) + _NUM_SCI.findall(r) + _NUM_SIMPLE.findall(r)
    out = []
    for p in preds:
        out += _normalize_open(p)
    return list(dict.fromkeys(out))


def open_answer_correct(prediction: str, answer: str | list[str]) -> bool:
    """MMMU `eval_open`: a normalised reference string contained in a predicted string, or a
    reference number equal to a predicted number."""
    golds = []
    for a in answer if isinstance(answer, list) else [answer]:
        golds += _normalize_open(a)
    for p in parse_open_response(prediction):
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True
        elif p in golds:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Yes / no (POPE)


def yes_no(text: str) -> str:
    """LLaVA's `eval_pope.py` reading of a free answer: the first sentence, commas removed, is "no"
    when it contains the word "No", "no" or "not", else "yes"."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall and F1 with "yes" as the positive class, and the share of "yes"
    predictions (lmms-eval `pope_aggregate_*`, LLaVA `eval_pope.py`). Predictions are read with
    `yes_no`; labels must be "yes" or "no"."""
    preds = [yes_no(p) for p in predictions]
    labs = [label.lower().strip() for label in labels]
    bad = sorted({x for x in labs if x not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be yes/no, got {bad[:3]}")
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, labs))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, labs))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, labs))
    n = len(labs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(p == g for p, g in zip(preds, labs)) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(p == "yes" for p in preds) / n if n else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# CIDEr-D

# Tokens coco-caption's PTBTokenizer wrapper deletes after tokenising.
_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_PTB_SPLIT = re.compile(r"(\.\.\.|--|[()\[\]{}.,!?;:\"`]|'(?:s|re|ve|ll|d|m|t)\b|n't\b|'|\s+)", re.IGNORECASE)


def ptb_tokenize(text: str) -> str:
    """Lowercased PTB-style tokens with punctuation removed, as coco-caption's `PTBTokenizer`
    (which runs Stanford CoreNLP in Java) produces for ordinary captions: "n't" and "'s"-type
    clitics split off, punctuation tokens dropped. A pure-Python approximation: rare constructs
    (URLs, abbreviations with periods) can tokenise differently from CoreNLP."""
    tokens = [t for t in _PTB_SPLIT.split(text.lower().replace("\n", " ")) if t and not t.isspace()]
    return " ".join(t for t in tokens if t not in _PTB_PUNCT)


def _ngrams(sentence: str, n: int = 4) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(
    candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015) exactly as coco-caption's `CiderScorer` computes it, on
    already-tokenised text (see `ptb_tokenize`): tf-idf n-gram vectors (n = 1..4) with document
    frequencies over the references of the whole corpus, candidate counts clipped to the
    reference's, a Gaussian length penalty (sigma 6) on the difference of *bigram* counts (the
    reference's quirk, kept), averaged over n and references, times 10. Returns (corpus mean,
    per-candidate scores). IDF needs a corpus: with one image every n-gram has idf 0."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    crefs = [[_ngrams(r, n) for r in refs] for refs in references]
    ctest = [_ngrams(c, n) for c in candidates]
    df: dict[tuple, float] = defaultdict(float)
    for refs in crefs:
        for ngram in {g for ref in refs for g in ref}:
            df[ngram] += 1
    ref_len = math.log(float(len(crefs))) if crefs else 0.0

    def vec(counts: Counter):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            v[k][ngram] = tf * (ref_len - math.log(max(1.0, df.get(ngram, 0.0))))
            norm[k] += v[k][ngram] ** 2
            if k == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for test, refs in zip(ctest, crefs):
        vh, nh, lh = vec(test)
        total = [0.0] * n
        for ref in refs:
            vr, nr, lr = vec(ref)
            delta = float(lh - lr)
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-(delta**2) / (2 * sigma**2))
        scores.append(sum(total) / n / max(len(refs), 1) * 10.0)
    return (sum(scores) / len(scores) if scores else 0.0), scores


# ---------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA)


def relaxed_accuracy(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed correctness (Methani et al. 2020; pix2struct / lmms-eval `relaxed_correctness`):
    numbers (a trailing % divides by 100) may be off by 5% of the target; other answers must match
    exactly, ignoring case."""

    def to_float(text: str) -> float | None:
        try:
            return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None

    p, t = to_float(prediction), to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()
