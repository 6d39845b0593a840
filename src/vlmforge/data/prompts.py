"""Prompts and label masks.

Each `<image>` marker of the data becomes `<image>` + N image placeholders + `</image>`, N being
the number of visual tokens the connector emits. With image splitting (a grid of crops plus the
whole image) each view's placeholders are preceded by a separator token naming it,
`<row_i_col_j>` or `<global_img>` (as Idefics3 does), so the LM knows which crop is which. At
native resolution a `<row_break>` token ends each row of an image's patch grid but the last
(LLaVA-NeXT's image newline), so the LM knows the grid's width, which varies. When an image's
views or tokens depend on its size (adaptive slicing, native resolution), the caller passes each
image's size and the builder asks `image_views(size)` (`VLM.image_views`) for its views as
(separator, tokens) pairs. With
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
ROW_BREAK = "<row_break>"
SPECIAL_TOKENS = [IMAGE_START, IMAGE_END, TEXT_START, TEXT_END, IMAGE_PAD]


def view_tokens(grid: int | tuple[int, int]) -> list[str]:
    """Separator tokens of the views of a k x k (or rows x cols) split, in view order (crops
    row-major, then the whole image); none without splitting."""
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    if rows <= 0:
        return []
    return [f"<row_{r}_col_{c}>" for r in range(1, rows + 1) for c in range(1, cols + 1)] + ["<global_img>"]


def separator_vocab(split_grid: int = 0, max_slices: int = 0, native: bool = False) -> list[str]:
    """Every separator a model's prompts may hold: a fixed k x k grid's, with adaptive slicing
    (`max_slices` > 0) those of any grid of at most `max_slices` slices, at native resolution the
    row break."""
    if native:
        return [ROW_BREAK]
    if max_slices:
        cells = range(1, max_slices + 1)
        return [f"<row_{r}_col_{c}>" for r in cells for c in cells if r * c <= max_slices] + ["<global_img>"]
    return view_tokens(split_grid)


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
    """Renders conversations to token ids and labels for one tokenizer and visual-token count:
    `tokens_per_image` and `split_grid` give every image's block; with `image_views` (size ->
    [(separator, tokens), ...]) each image's block comes from its size (`encode(messages, sizes)`)."""

    def __init__(
        self, tokenizer, tokens_per_image: int, layout: str = "llama3v", split_grid: int = 0, image_views=None
    ):
        if layout not in ("llama3v", "inline", "bare"):
            raise ValueError(f"unknown prompt layout {layout!r} (use 'llama3v', 'inline' or 'bare')")
        if image_views is not None and layout == "bare":
            raise ValueError("images of varying visual tokens need the <image> markers: use layout llama3v or inline")
        self.tok = tokenizer
        self.tokens_per_image = tokens_per_image
        self.layout = layout
        self.image_views = image_views
        self._separators: set[str] = set()  # separators found in the vocabulary (asked once each)
        seps = view_tokens(split_grid) if tokens_per_image else []
        if seps and tokens_per_image % len(seps):
            raise ValueError(f"{tokens_per_image} visual tokens per image do not split into {len(seps)} views")
        per_view = tokens_per_image // max(len(seps), 1)
        self.image_block = self.block([(sep, per_view) for sep in seps] if seps else [(None, tokens_per_image)])
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        eot = [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in tokenizer.get_vocab()]
        self.stop_ids = sorted({i for i in eot + [tokenizer.eos_token_id] if i is not None})

    def block(self, views: list[tuple[str | None, int]]) -> str:
        """One image's block: each view's separator (if any) and its placeholders."""
        new = {sep for sep, _ in views if sep is not None} - self._separators
        if new:  # `get_vocab` copies the whole vocabulary: asked once per separator, not per image
            missing = sorted(new - set(self.tok.get_vocab()))
            if missing:
                raise ValueError(f"the tokenizer lacks the view separator tokens {missing[:3]} (use load_tokenizer)")
            self._separators |= new
        body = "".join((sep or "") + IMAGE_PAD * n for sep, n in views)
        return body if self.layout == "bare" else IMAGE_START + body + IMAGE_END

    def expand(self, content: str, blocks=None) -> str:
        """`content` with its `<image>` markers expanded; `blocks` yields each image's block in
        turn (default: the fixed block)."""
        n = content.count("<image>")
        if n == 0:
            return content
        parts = [next(blocks) if blocks is not None else self.image_block for _ in range(n)]
        if self.layout in ("inline", "bare"):
            pieces = content.split("<image>")
            return "".join(p + b for p, b in zip(pieces, parts)) + pieces[-1]
        text = content.replace("<image>", "").strip()
        return "".join(parts) + TEXT_START + text + TEXT_END

    @property
    def variable(self) -> bool:
        """Whether an image's block depends on its size (then `sizes` must be given)."""
        return self.image_views is not None

    def messages(self, messages: list[dict], sizes: list | None = None) -> list[dict]:
        """The messages with their image blocks; `sizes`: each image's (width, height) in order of
        appearance (needed when the blocks vary from image to image, ignored otherwise)."""
        if not self.variable:
            return [{"role": m["role"], "content": self.expand(m["content"])} for m in messages]
        n = sum(m["content"].count("<image>") for m in messages)
        if n and sizes is None:
            raise ValueError("this model's visual tokens depend on each image's size: pass the images' sizes")
        if n and len(sizes) != n:
            raise ValueError(f"the conversation has {n} <image> markers but {len(sizes)} images were given")
        blocks = iter([self.block(self.image_views(tuple(sz))) for sz in sizes or []])
        return [{"role": m["role"], "content": self.expand(m["content"], blocks)} for m in messages]

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

    def encode(self, messages: list[dict], sizes: list | None = None) -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE outside assistant turns) for a whole conversation; `sizes`:
        its images' (width, height), in order."""
        text, spans = self.assistant_spans(self.messages(messages, sizes))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = enc["input_ids"], []
        for tid, (s, e) in zip(ids, enc["offset_mapping"]):
            inside = any(a <= s < b for a, b in spans) and e > s
            labels.append(tid if inside else IGNORE)
        return ids, labels

    def encode_prompt(self, messages: list[dict], sizes: list | None = None) -> list[int]:
        """Token ids of a conversation ending with the generation prompt (for inference)."""
        text = self.render(self.messages(messages, sizes), add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]
