"""Hand-computed cases for every scoring rule, the tricky normalisations included."""

import pytest

from vlmforge.eval.metrics import (
    anls,
    cider_d,
    exact_match,
    mmstar_match,
    normalize_answer,
    open_answer_correct,
    parse_multi_choice,
    pope_scores,
    process_punctuation,
    ptb_tokenize,
    relaxed_accuracy,
    vqa_accuracy,
    yes_no,
)


def test_vqa_normalization():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("the cat.") == "cat"
    assert normalize_answer("A Red Circle!") == "red circle"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("  Yes\n") == "yes"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("black-and-white") == "black and white"  # '-' not next to a space: a space
    assert normalize_answer("yes - no") == "yes no"  # '-' next to a space: dropped
    assert normalize_answer("What?") == "what"
    assert exact_match("Purple.", "purple")
    assert not exact_match("purple", "orange")


def test_vqa_accuracy_ten_answers_partial_agreement():
    answers = ["2"] * 2 + ["two"] + ["3"] * 7  # normalised: three humans said 2, seven said 3
    # each leave-one-out subset: dropping a "2" leaves 2 matches (2/3), dropping another answer
    # leaves 3 (1); mean = (3 * 2/3 + 7 * 1) / 10
    assert vqa_accuracy("Two", answers) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa_accuracy("4", answers) == 0.0
    one = ["cat"] + ["dog"] * 9  # one human: dropping them leaves 0, others leave 1 match (1/3)
    assert vqa_accuracy("the cat.", one) == pytest.approx(9 * (1 / 3) / 10)


def test_vqa_accuracy_rules_of_lmms_eval_and_of_vqaeval():
    # VQAv2's official vqaEval.py: the answers keep their case and words unless they differ, and
    # then lose only their punctuation
    assert vqa_accuracy("Two", ["two"] * 10, "vqaeval") == 0.0
    assert vqa_accuracy("Two", ["two"] * 10, "evalai") == 1.0
    assert vqa_accuracy("Two", ["two"] * 10, "vqav2") == 1.0  # lmms-eval processes them anyway
    assert vqa_accuracy("2", ["two"] * 9 + ["three"], "vqaeval") == 0.0  # no digit mapping of answers
    assert vqa_accuracy("2", ["2"] * 9 + ["three"], "vqaeval") == pytest.approx(1.0)
    assert vqa_accuracy("1,000", ["1000"] * 5 + ["1,000"] * 5, "vqaeval") == pytest.approx(1.0)
    # "'s": EvalAI's whole processor splits it off the prediction; the VQAv2 rules do not
    assert vqa_accuracy("man's", ["man's"] * 5 + ["man"] * 5, "vqav2") == 1.0
    assert vqa_accuracy("man's", ["man's"] * 5 + ["man"] * 5, "vqaeval") == 1.0
    # at most 32 periods go (the reference passes re.UNICODE as `sub`'s count)
    assert process_punctuation("a" + "." * 40) == "a" + "." * 8
    with pytest.raises(ValueError, match="unknown VQA rule 'if_differ'"):
        vqa_accuracy("x", ["x"], "if_differ")
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


def test_anls():
    assert anls("hello word", ["hello world"]) == pytest.approx(1 - 1 / 11)
    assert anls("Hello  World ", ["hello world"]) == pytest.approx(1 - 0 / 13)
    assert anls("abef", ["abcd"]) == pytest.approx(0.5)  # exactly the threshold: kept
    assert anls("abeff", ["abcd"]) == 0.0  # similarity 2/5 < 0.5
    assert anls("xyz", ["hello", "xyw"]) == pytest.approx(1 - 1 / 3)  # best answer counts
    assert anls("", [""]) == 1.0


def test_multiple_choice_parsing():
    opts = ["cat", "dog", "bird", "fish"]
    assert parse_multi_choice("(B)", opts) == "B"
    assert parse_multi_choice("B", opts) == "B"
    assert parse_multi_choice("B.", opts) == "B"
    assert parse_multi_choice("The answer is C.", opts) == "C"
    assert parse_multi_choice("I think (A) or maybe (D)", opts) == "D"  # several: the last one
    assert parse_multi_choice("the animal in the picture is a small dog", opts) == "B"  # option text
    assert parse_multi_choice("dog", opts) is None  # 1 word: text matching is not tried
    assert parse_multi_choice("no idea", opts) is None
    seeded = parse_multi_choice("no idea", opts, seed=0)
    assert seeded in "ABCD" and seeded == parse_multi_choice("no idea", opts, seed=0)


def test_mmstar_match():
    assert mmstar_match("B", "B")
    assert mmstar_match("b) dog", "B")
    assert mmstar_match("(C) bird", "C")
    assert mmstar_match("Option A", "A")
    assert mmstar_match("The answer is D", "D")
    assert not mmstar_match("I think it is B", "B")  # MMStar reads only the first character
    assert not mmstar_match("", "A")


def test_open_answers():
    assert open_answer_correct("The total is 1,000.", "1000")
    assert open_answer_correct("so the answer is 3.14159", "3.14")
    assert open_answer_correct("Paris", "paris")
    assert not open_answer_correct("London", "paris")


def test_yes_no_and_pope():
    assert yes_no("Yes, there is a dog.") == "yes"
    assert yes_no("No.") == "no"
    assert yes_no("There is not a dog in the image.") == "no"
    assert yes_no("Yes. No doubt.") == "yes"  # only the first sentence counts
    # lmms-eval: an answer counts as it is: "Yes." is neither yes nor no (wrong, in no count);
    # its yes_ratio is the share of yes labels
    s = pope_scores(["yes", "Yes.", "no", "no", "yes"], ["yes", "no", "yes", "no", "yes"])
    assert s["accuracy"] == pytest.approx(3 / 5) and s["precision"] == 1.0 and s["recall"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 5) and s["predicted_yes_ratio"] == pytest.approx(2 / 5)
    s = pope_scores(["yes", "Yes.", "no", "no", "yes"], ["yes", "no", "yes", "no", "yes"], "official")
    # POPE's reading: "Yes." is yes; tp 2, fp 1, fn 1, tn 1
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="yes/no"):
        pope_scores(["yes"], ["maybe"])


def test_cider_d_matches_coco_caption():
    refs = [
        [
            "a man riding a horse on a beach",
            "a person rides a brown horse near the ocean",
            "man on horseback at the beach",
        ],
        ["two dogs playing in the snow", "a pair of dogs run through snow", "dogs playing outside in winter snow"],
        [
            "a plate of food with broccoli and rice",
            "rice and broccoli on a white plate",
            "a healthy meal of rice and vegetables",
        ],
    ]
    cands = ["a man riding a horse on the beach", "a dog in the snow", "a white plate with rice"]
    corpus, each = cider_d(cands, refs)
    # pycocoevalcap 1.2 `Cider().compute_score` on the same (already tokenised) captions:
    # 2.1853477756023794, [3.2461533837648853, 1.6175344752745389, 1.6923554677677144]
    assert corpus == pytest.approx(2.1853477756023794, rel=1e-12)
    assert each == pytest.approx([3.2461533837648853, 1.6175344752745389, 1.6923554677677144], rel=1e-12)
    assert cider_d(["a b c"], [["a b c"]])[0] == 0.0  # one image: every idf is log(1/1) = 0
    with pytest.raises(ValueError, match="reference lists"):
        cider_d(["a"], [])


def test_ptb_tokenize():
    assert ptb_tokenize("A man's dog, running!") == "a man 's dog running"
    assert ptb_tokenize("It doesn't fit...") == "it does n't fit"
    assert ptb_tokenize("A black-and-white photo.") == "a black-and-white photo"


def test_relaxed_accuracy():
    assert relaxed_accuracy("104", "100")
    assert not relaxed_accuracy("106", "100")
    assert relaxed_accuracy("51%", "0.5")
    assert relaxed_accuracy("Yes", "yes")
    assert not relaxed_accuracy("0", "0.1")
