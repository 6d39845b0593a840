"""Prompts and label masks.

Each `<image>` marker of the data becomes `<image>` + N image placeholders + `</image>`, N being
the number of visual tokens the connector emits. With image splitting (a k x k grid of crops plus
the whole image) each view's placeholders are preceded by a separator token naming it,
`<row_i_col_j>` or `<global_img>` (as Idefics3 does), so the LM knows which crop is which. With
the Llama3-V layout the image blocks come before the text, which is wrapped in `<text>`…`</text>`;
the `bare` layout puts the placeholders alone in place of the marker (LLaVA-1.5's prompts).
The conversation is then rendered with the tokenizer's own chat template.

Labels come from character offsets: each assistant span is located by rendering the conversation
up to that turn (with and without the generation prompt), and a token is trained on when its first
character lies in such a span. No per-template length arithmetic, so any chat template works; a
template whose renderings are not prefixes of each other is refused with a clear error.
"""

from __future__ import annotations

IMAGE_START, IMAGE_END = "<image>", "</image>"
TEXT_START, TEXT_END = "<text>", "</text>"
IMAGE_PAD = "<|image_pad|>"
SPECIAL_TOKENS = [IMAGE_START, IMAGE_END, TEXT_START, TEXT_END, IMAGE_PAD]


def view_tokens(grid: int) -> list[str]:
    """Separator tokens of the views of a k x k split, in view order (crops row-major, then the
    whole image); none without splitting."""
    if grid <= 0:
        return []
    return [f"<row_{r}_col_{c}>" for r in range(1, grid + 1) for c in range(1, grid + 1)] + ["<global_img>"]


IGNORE = -100

# Used only for tokenizers that ship without a chat template (base LMs).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


class TemplateError(ValueError):
    """The chat template cannot be used to locate assistant turns."""


class PromptBuilder:
    """Renders conversations to token ids and labels for one tokenizer and visual-token count."""

    def __init__(self, tokenizer, tokens_per_image: int, layout: str = "llama3v", split_grid: int = 0):
        if layout not in ("llama3v", "inline", "bare"):
            raise ValueError(f"unknown prompt layout {layout!r} (use 'llama3v', 'inline' or 'bare')")
        self.tok = tokenizer
        self.tokens_per_image = tokens_per_image
        self.layout = layout
        seps = view_tokens(split_grid) if tokens_per_image else []
        missing = [t for t in seps if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the tokenizer lacks the view separator tokens {missing[:3]} (use load_tokenizer)")
        if seps and tokens_per_image % len(seps):
            raise ValueError(f"{tokens_per_image} visual tokens per image do not split into {len(seps)} views")
        per_view = tokens_per_image // max(len(seps), 1)
        views = "".join(sep + IMAGE_PAD * per_view for sep in seps) if seps else IMAGE_PAD * tokens_per_image
        self.image_block = views if layout == "bare" else IMAGE_START + views + IMAGE_END
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        eot = [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in tokenizer.get_vocab()]
        self.stop_ids = sorted({i for i in eot + [tokenizer.eos_token_id] if i is not None})

    def expand(self, content: str) -> str:
        n = content.count("<image>")
        if n == 0:
            return content
        if self.layout in ("inline", "bare"):
            return content.replace("<image>", self.image_block)
        text = content.replace("<image>", "").strip()
        return self.image_block * n + TEXT_START + text + TEXT_END

    def messages(self, messages: list[dict]) -> list[dict]:
        return [{"role": m["role"], "content": self.expand(m["content"])} for m in messages]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of each assistant turn (end-of-turn included)."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            after = self.render(messages[: i + 1])
            if not (full.startswith(before) and full.startswith(after) and len(after) > len(before)):
                raise TemplateError(
                    "the chat template does not render conversations as prefixes of each other, "
                    f"so assistant turn {i} cannot be located by character offsets"
                )
            spans.append((len(before), len(after)))
        return full, spans

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE outside assistant turns) for a whole conversation."""
        text, spans = self.assistant_spans(self.messages(messages))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = enc["input_ids"], []
        for tid, (s, e) in zip(ids, enc["offset_mapping"]):
            inside = any(a <= s < b for a, b in spans) and e > s
            labels.append(tid if inside else IGNORE)
        return ids, labels

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation ending with the generation prompt (for inference)."""
        text = self.render(self.messages(messages), add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]
