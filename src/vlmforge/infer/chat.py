"""`vlmforge chat`: answer a question about an image once, or loop on prompts from stdin.

The conversation history is kept across turns of the loop, with the image in the first turn.
"""

from __future__ import annotations

import sys

from vlmforge.data.images import load_image
from vlmforge.infer.engine import Engine
from vlmforge.infer.request import SamplingParams


def chat(
    model: str, image: str | None = None, question: str | None = None, max_new_tokens: int = 64, dtype: str = "float32"
) -> list[str]:
    """Ask about an image: one answer with a question, else a prompt loop on stdin.

    Answers are printed as they are generated (the engine streams them); each turn reuses the keys
    and values of the conversation so far (the engine's prefix cache).

    Args:
        model: vlmforge model folder.
        image: image file.
        question: the question; without it, read questions line by line.
        max_new_tokens: longest answer.
        dtype: the LM's weights as served: float32 (as saved), bfloat16, or int8 (weight-only, one scale
            per output row, torch's int8 kernel; the vision tower and connector stay float32).
    """
    from vlmforge.model.quant import load

    picture = load_image(image) if image else None  # a bad image file is refused before the model loads
    vlm = load(model, dtype)
    history: list[dict] = []
    answers = []
    engine = Engine(vlm)

    def ask(q: str) -> str:
        content = ("<image>\n" + q) if (picture is not None and not history) else q
        msgs = history + [{"role": "user", "content": content}]
        ids = vlm.prompts.encode_prompt(msgs, [picture.size] if picture is not None else None)
        shown = []

        def show(ev):
            text = ev.text if shown else ev.text.lstrip()
            if text:
                print(text, end="", flush=True)
                shown.append(text)

        images = [picture] if picture is not None else []
        req = engine.submit(ids, images, SamplingParams(max_tokens=max_new_tokens), on_event=show)
        while not req.done:
            engine.step()
        print(flush=True)
        ans = req.text.strip()
        history.extend([{"role": "user", "content": content}, {"role": "assistant", "content": ans}])
        return ans

    if question:
        answers.append(ask(question))
        return answers
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if line.strip():
            answers.append(ask(line.strip()))
    return answers
