import copy

import pytest

from vlmforge.data.prompts import IGNORE, IMAGE_PAD, PromptBuilder, TemplateError
from vlmforge.model.vlm import load_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)
# Llama-3.1 style: a default system prompt is inserted when there is none.
LLAMA31 = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023<|eot_id|>{% endif %}{% for m in messages %}<|start_header_id|>"
    "{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CONV = [
    {"role": "user", "content": "<image>\nWhat color is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "How many shapes are there?"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "Describe the image."},
    {"role": "assistant", "content": "a red circle, a blue square and a green triangle"},
]


def _runs(ids, labels):
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.mark.parametrize(
    "template, end",
    [(None, "<|eot_id|>"), (LLAMA31, "<|eot_id|>"), (CHATML, "<|im_end|>\n"), (MISTRAL, "</s>")],
    ids=["llama3", "llama3.1-system", "chatml", "mistral"],
)
def test_labels_cover_exactly_the_assistant_turns(backbones, template, end):
    tok = copy.deepcopy(load_tokenizer(str(backbones["lm"])))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "</s>", "[INST]", "[/INST]"]})
    if template:
        tok.chat_template = template
    pb = PromptBuilder(tok, tokens_per_image=5)
    ids, labels = pb.encode(CONV)
    assert len(ids) == len(labels)
    assert ids.count(pb.image_token_id) == 5
    runs = [tok.decode(r) for r in _runs(ids, labels)]
    assert runs == [m["content"] + end for m in CONV if m["role"] == "assistant"]


def test_layouts(backbones):
    tok = load_tokenizer(str(backbones["lm"]))
    text = PromptBuilder(tok, 3, "llama3v").render(PromptBuilder(tok, 3, "llama3v").messages(CONV[:1]))
    assert f"<image>{IMAGE_PAD * 3}</image><text>What color is the circle?</text>" in text
    inline = PromptBuilder(tok, 2, "inline")
    assert f"<image>{IMAGE_PAD * 2}</image>\nWhat color" in inline.render(inline.messages(CONV[:1]))


def test_prompt_for_generation_ends_with_assistant_header(backbones):
    tok = load_tokenizer(str(backbones["lm"]))
    pb = PromptBuilder(tok, 4)
    ids = pb.encode_prompt(CONV[:1])
    assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.convert_tokens_to_ids("<|eot_id|>") in pb.stop_ids


def test_template_that_is_not_prefix_consistent_is_refused(backbones):
    tok = copy.deepcopy(load_tokenizer(str(backbones["lm"])))
    # renders the last assistant turn differently from earlier ones (as "thinking" templates do)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %}!{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(TemplateError, match="assistant turn 1"):
        PromptBuilder(tok, 2).encode(CONV)


def test_view_separators_missing_from_the_tokenizer_are_named(backbones):
    """A tokenizer not loaded with the model's separators (`load_tokenizer`'s job) is refused by
    name, for a fixed grid at once and for a size-dependent block when it first needs one."""
    tok = load_tokenizer(str(backbones["lm"]))  # no grid asked for: no separators
    with pytest.raises(ValueError, match=r"lacks the view separator tokens \['<global_img>', '<row_1_col_1>'"):
        PromptBuilder(tok, 10, split_grid=2)
    sliced = PromptBuilder(tok, 10, image_views=lambda size: [("<row_1_col_1>", 2), ("<global_img>", 2)])
    with pytest.raises(ValueError, match="lacks the view separator tokens"):
        sliced.encode_prompt(CONV[:1], [(64, 32)])
    with_seps = load_tokenizer(str(backbones["lm"]), split_grid=2)
    ok = PromptBuilder(with_seps, 10, image_views=lambda size: [("<row_1_col_1>", 2), ("<global_img>", 3)])
    for _ in range(2):  # the second block is checked against the separators already found
        assert ok.encode_prompt(CONV[:1], [(64, 32)]).count(ok.image_token_id) == 5
