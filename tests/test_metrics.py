from vlmforge.eval.metrics import exact_match, normalize_answer


def test_vqa_normalization():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("the cat.") == "cat"
    assert normalize_answer("A Red Circle!") == "red circle"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("  Yes\n") == "yes"
    assert normalize_answer("3.5") == "3.5"
    assert exact_match("Purple.", "purple")
    assert not exact_match("purple", "orange")
