"""Scoring rules of the standard VLM benchmarks, each as a named reference computes it.

Published scores are computed by lmms-eval and VLMEvalKit; scores that differ from papers come
mostly from answer normalisation and parsing, so every rule here reproduces a reference
implementation, quirks included, and names it in its docstring. Two scorings (`SCORINGS`):
`lmms-eval` (the default: lmms-eval 0.7.3's task code, what most published numbers come from,
tested against the installed package case by case) and `official` (the benchmark's own code where
it differs: VQAv2's vqaEval.py, MMStar's first-character matcher, POPE's yes/no reading).
`METRICS_VERSION` is written into every report; it changes whenever a rule here changes.

- `normalize_answer`, `vqa_accuracy`: VQAv2 / TextVQA (EvalAI's answer processing; lmms-eval tasks
  `vqav2`, `textvqa`; rule `vqaeval` for VQAv2's official vqaEval.py).
- `anls`: DocVQA / InfographicVQA (lmms-eval `anls`, threshold 0.5).
- `parse_multi_choice`: MMMU letter extraction (the MMMU repository's parser, as lmms-eval uses it).
- `extract_mcq_answer`, `mmstar_match`: MMStar (lmms-eval's extractor; MMStar's own matcher).
- `parse_open_response`, `open_answer_correct`: MMMU open questions.
- `pope_scores`, `yes_no`: POPE (lmms-eval's exact reading; POPE's and LLaVA's yes/no reading).
- `cider_d`: CIDEr-D for captions (coco-caption's `CiderScorer`), pure Python.
- `exact_match`, `relaxed_accuracy`: exact match after normalisation; ChartQA's relaxed accuracy.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict

from vlmforge.config import check_choice

# 2: lmms-eval 0.7.3's rules by default (VQAv2, MMStar, POPE), `official` by name; MMMU's empty
# open-answer candidates dropped; at most 32 periods removed in EvalAI's processing.
METRICS_VERSION = "2"
SCORINGS = ("lmms-eval", "official")


# ---------------------------------------------------------------------------------------------
# VQA answer processing: EvalAI's processor (facebookresearch/mmf pythia/tasks/processors.py),
# the one lmms-eval's `vqa_eval_metric.EvalAIAnswerProcessor` copies.

_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
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
    # the reference passes `re.UNICODE` (32) where `sub` takes its count: at most 32 periods go
    return _PERIOD_STRIP.sub("", out, 32)


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


def _leave_one_out(pred: str, refs: list[str]) -> float:
    """min(#other answers equal to `pred` / 3, 1), averaged over leaving each answer out."""
    scores = [min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))]
    return sum(scores) / len(scores)


VQA_RULES = ("evalai", "vqav2", "vqaeval")


def vqa_accuracy(prediction: str, answers: list[str], rule: str = "evalai") -> float:
    """VQA accuracy: min(#other humans who gave the answer / 3, 1), averaged over the 10
    leave-one-out subsets of the human answers. `rule` says how answers are processed first:
    - `evalai` (TextVQA; lmms-eval `textvqa_process_results`): the prediction and every answer
      through EvalAI's whole processor (`normalize_answer`);
    - `vqav2` (lmms-eval 0.7.3 `vqav2_process_results`): newlines and tabs to spaces, stripped, then
      punctuation and digits / articles / contractions, on the prediction and every answer ("man's"
      stays "man's");
    - `vqaeval` (VQAv2's official vqaEval.py, GT-Vision-Lab/VQA): the prediction stripped and
      processed as above; the answers only when they are not all the same string, and then only
      their punctuation (so "Two" against ten "two" scores 0: the answers keep their case).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if rule == "evalai":
        return _leave_one_out(normalize_answer(prediction), [normalize_answer(a) for a in answers])
    if rule not in VQA_RULES:
        raise ValueError(f"unknown VQA rule {rule!r} (use one of {', '.join(VQA_RULES)})")
    flat = lambda t: t.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
    pred = process_digit_article(process_punctuation(flat(prediction)))
    if rule == "vqav2":
        return _leave_one_out(pred, [process_digit_article(process_punctuation(flat(a))) for a in answers])
    refs = list(answers)
    if len(set(refs)) > 1:
        refs = [process_punctuation(a) for a in refs]
    return _leave_one_out(pred, refs)


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


# lmms-eval 0.7.3 `_task_utils/mcq_extract.py`: phrases after which the first choice letter is the
# answer, and how much each way of writing a letter counts.
_ANSWER_PHRASES = (
    "the answer is",
    "answer is",
    "the correct answer is",
    "correct answer is",
    "the best answer is",
    "best answer is",
    "the correct option is",
    "correct option is",
    "the best option is",
    "best option is",
    "the choice is",
    "choice is",
    "the correct choice is",
    "correct choice is",
    "i choose",
    "i select",
    "i pick",
    "my answer is",
    "my choice is",
    "옵션",
    "정답은",
    "답은",
    "답:",
    "答案是",
    "答案为",
    "选",
    "答えは",
)
_LETTER_FORMS = (("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2))  # form, priority


def extract_mcq_answer(response: str, choices: list[str]) -> str:
    """The choice letter a free answer gives, by lmms-eval 0.7.3's `extract_mcq_answer` (what its
    MMStar task scores with); "" when none. Every way the letter may be written is a candidate with
    a priority: the whole answer starting with the letter (10) or ending with it (9), the first
    letter after an answer phrase such as "the correct answer is" (7), "(B)" (6), "B." (5), "B:"
    (4), "B)" (3), "B " (2), and, only when none of these occurs, the letter anywhere (0). The
    highest priority wins, then the latest position, then the earliest found."""
    if not response or not response.strip():
        return ""
    text = response.strip()
    for ch in (",", ".", "!", "?", ";", ":", "'", '"'):
        text = text.strip(ch)
    text = f" {text} "
    found: list[tuple[int, int, str]] = []  # (priority, position, letter), in the reference's order
    for form, priority in _LETTER_FORMS:
        found += [(priority, text.rfind(form.format(c)), c) for c in choices if form.format(c) in text]
    lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            found += [(7, text.find(c, at + len(phrase)), c) for c in choices if text.find(c, at + len(phrase)) != -1]
    core = text.strip()
    found += [(10, 0, c) for c in choices if core.startswith(c) and (len(core) == 1 or not core[1].isalpha())]
    found += [(9, len(text) - 1, c) for c in choices if core.endswith(c) and (len(core) == 1 or not core[-2].isalpha())]
    if not found:
        found = [(0, text.rfind(c), c) for c in choices if c in text]
    return max(found, key=lambda f: (f[0], f[1]))[2] if found else ""


def mmstar_correct(prediction: str, answer: str, scoring: str = "lmms-eval") -> bool:
    """MMStar: `lmms-eval` (0.7.3 `mmstar.utils.exact_match`): `extract_mcq_answer` over A-D equals
    the answer's letter; `official`: MMStar's own first-character matcher (`mmstar_match`)."""
    check_choice("scoring", scoring, SCORINGS)
    if scoring == "official":
        return mmstar_match(prediction, answer)
    return extract_mcq_answer(prediction, ["A", "B", "C", "D"]) == answer.strip().upper()


def mmstar_match(prediction: str, answer: str) -> bool:
    """MMStar's own matcher (the MMStar release's, and lmms-eval's before 0.7): the first character
    of the answer, or the one after "(", "option " or "the answer is "."""
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
        shortest = ""  # the reference's walk: an empty tail is replaced by the next phrase's tail
        for k in indicators:
            if k in sent:
                tail = sent.split(k)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        # still empty (the sentence ends in its key phrases): no candidate, as in the reference
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
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


def pope_scores(predictions: list[str], labels: list[str], scoring: str = "lmms-eval") -> dict:
    """Accuracy, precision, recall and F1 with "yes" as the positive class, and yes ratios.

    - `lmms-eval` (0.7.3 `pope_process_results` and `pope_aggregate_*`): a prediction is the
      answer lowercased and stripped, as it is: "Yes." or "yes, there is" is neither "yes" nor
      "no", so it is wrong and counts in none of the true / false positives or false negatives;
      its `yes_ratio` is the share of "yes" *labels* (as lmms-eval computes it);
    - `official` (POPE's evaluate.py, as LLaVA's `eval_pope.py` copies it): each answer read as
      yes or no by `yes_no`; `yes_ratio` the share of "yes" predictions.
    `predicted_yes_ratio` (both): the share of predictions read as "yes". Labels must be yes / no.
    """
    check_choice("scoring", scoring, SCORINGS)
    labs = [label.lower().strip() for label in labels]
    bad = sorted({x for x in labs if x not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be yes/no, got {bad[:3]}")
    if scoring == "official":
        preds = [yes_no(p) for p in predictions]
    else:
        preds = [p.lower().strip() for p in predictions]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, labs))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, labs))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, labs))
    n = len(labs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    predicted_yes = sum(p == "yes" for p in preds) / n if n else 0.0
    return {
        "accuracy": sum(p == g for p, g in zip(preds, labs)) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": predicted_yes if scoring == "official" else (labs.count("yes") / n if n else 0.0),
        "predicted_yes_ratio": predicted_yes,
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
