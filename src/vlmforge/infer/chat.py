"""`vlmforge chat`: answer a question about an image once, or loop on prompts from stdin.

The conversation history is kept across turns of the loop, with the image in the first turn.
"""

from __future__ import annotations

import sys

from vlmforge.data.images import load_image


def chat(model, image: str | None, question: str | None = None, max_new_tokens: int = 64) -> list[str]:
    pixels = model.processor.views(load_image(image)) if image else None
    history: list[dict] = []
    answers = []

    def ask(q: str) -> str:
        content = ("<image>\n" + q) if (pixels is not None and not history) else q
        msgs = history + [{"role": "user", "content": content}]
        ids = model.prompts.encode_prompt(msgs)
        out = model.generate([ids], pixel_values=pixels, max_new_tokens=max_new_tokens)[0]
        ans = model.tokenizer.decode(out, skip_special_tokens=True).strip()
        history.extend([{"role": "user", "content": content}, {"role": "assistant", "content": ans}])
        return ans

    if question:
        answers.append(ask(question))
        print(answers[-1])
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
            print(answers[-1], flush=True)
    return answers
