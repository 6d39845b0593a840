"""Answer normalisation and accuracy.

`normalize_answer` follows the official VQA evaluation's answer processing (Antol et al. 2015,
vqaEval.py): lowercase, punctuation removed (a period between digits kept, commas in numbers
dropped), number words to digits, articles dropped, common contractions restored.
"""

from __future__ import annotations

import re

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "isnt": "isn't", "shouldnt": "shouldn't", "wasnt": "wasn't", "werent": "weren't", "wont": "won't",
    "wouldnt": "wouldn't", "youre": "you're", "theyre": "they're", "thats": "that's", "whats": "what's",
}  # fmt: skip
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")


def _punct(text: str) -> str:
    text = _COMMA_NUMBER.sub(r"\1\3", text)
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(r"\d,\d", text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    out = out.replace("'", "") if out.replace("'", "") in _CONTRACTIONS else out
    return out


def normalize_answer(text: str) -> str:
    text = _punct(text.replace("\n", " ").replace("\t", " ").strip().lower())
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)
