import json

import pytest

from vlmforge.data.formats import DataError, load_records


def _write(path, rows):
    path.write_text(json.dumps(rows))
    return path


def test_valid_records_and_image_marker_added(tmp_path):
    with_image = [{"from": "human", "value": "hi?"}, {"from": "gpt", "value": "yo"}]
    text_only = [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]
    f = _write(
        tmp_path / "d.json",
        [{"id": "a", "image": "x.png", "conversations": with_image}, {"id": "b", "conversations": text_only}],
    )
    recs = load_records(f)
    assert recs[0].images == [tmp_path / "x.png"]
    assert recs[0].messages[0]["content"].startswith("<image>\n")
    assert recs[1].images == [] and recs[1].messages[1] == {"role": "assistant", "content": "ok"}


def test_malformed_json_names_the_file(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text('[{"id": 1, "conversations": [}')
    with pytest.raises(DataError, match="broken.json: malformed JSON at line 1"):
        load_records(f)
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "record, words",
    [
        ({"id": "r1", "conversations": []}, "non-empty list"),
        ({"id": "r1", "conversations": [{"from": "robot", "value": "x"}]}, "turn 0"),
        ({"id": "r1", "conversations": [{"from": "gpt", "value": "x"}]}, "alternate"),
        ({"id": "r1", "conversations": [{"from": "human", "value": "<image> a"}]}, "0 images"),
        ({"id": "r1", "image": 5, "conversations": [{"from": "human", "value": "a"}]}, "'image' must be"),
    ],
)
def test_malformed_record_names_file_and_record(tmp_path, record, words):
    good = {"id": "r0", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    f = _write(tmp_path / "d.json", [good, record])
    with pytest.raises(DataError) as e:
        load_records(f)
    msg = str(e.value)
    assert "d.json record 1 (id=r1)" in msg and words in msg


def test_every_malformed_record_is_named_in_one_error(tmp_path):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad = [{"id": f"b{i}", "conversations": []} for i in range(25)]
    rows = [good, bad[0], good, bad[1], {"id": "c", "image": 5, "conversations": [{"from": "human", "value": "a"}]}]
    f = _write(tmp_path / "d.json", rows + bad[2:])
    with pytest.raises(DataError) as e:
        load_records(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: 26 malformed records of 28:")
    assert "record 1 (id=b0)" in msg and "record 3 (id=b1)" in msg and "record 4 (id=c): 'image' must be" in msg
    assert len(msg.splitlines()) == 1 + 20 + 1 and msg.endswith("… and 6 more")


def test_malformed_records_and_unreadable_images_are_named_in_one_pass(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    rows = [
        {"id": "fine", "image": "ok.png", "conversations": turns},
        {"id": "gone", "image": "missing.png", "conversations": turns},
        {"id": "bad", "conversations": []},
        {"id": "torn", "image": "broken.png", "conversations": turns},
    ]
    with pytest.raises(DataError) as e:
        load_records(_write(tmp_path / "d.json", rows))
    msg = str(e.value)
    assert "1 malformed records and 2 with an unreadable image of 4" in msg
    assert "record 2 (id=bad)" in msg and "record 1 (id=gone)" in msg and "missing.png: image file not found" in msg
    assert "record 3 (id=torn)" in msg and "broken.png" in msg and "id=fine" not in msg


def test_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    row = {"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    f.write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n{bad\n")
    with pytest.raises(DataError, match="d.jsonl:4: malformed JSON line"):
        load_records(f)
