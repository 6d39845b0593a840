"""The model card (README.md) every export writes: what the model is, how it was made, how it
scored, how to use it in the format written."""

from __future__ import annotations

import dataclasses
from pathlib import Path


def _visual_tokens(vlm) -> str:
    """The visual tokens per image, as the card says it."""
    if vlm.processor.slicing == "adaptive":
        return f"up to {vlm.tokens_per_image} (adaptive slicing, at most {vlm.processor.max_slices} slices + the whole)"
    if vlm.processor.resize == "native":
        return f"{vlm.tokens_per_image} at {vlm.processor.size}px square, varying with each image's size (native)"
    return str(vlm.tokens_per_image)


def model_card(
    vlm,
    fmt: str,
    evals: list[dict] | None = None,
    notes: list[str] | None = None,
    sources: tuple[str, str] | None = None,
) -> str:
    """README.md of an export: what the model is, how it was made and how it scored. `sources`:
    the vision encoder and LM the model was first built from (Hub ids become `base_model`)."""
    c = vlm.config
    vision_src, lm_src = sources or (c.vision, c.lm)
    base = [b for b in (vision_src, lm_src) if b and not Path(b).exists()]
    library = {"llava-hf": "transformers", "gguf": "gguf"}.get(fmt, "vlmforge")
    lines = ["---", f"library_name: {library}", "pipeline_tag: image-text-to-text", "tags: [vlmforge, vision-language]"]
    if base:
        lines += ["base_model:"] + [f"- {b}" for b in base]
    lines += ["---", "", "# Vision-language model built with vlmforge", ""]
    lines.append(
        f"Format: **{fmt}**. Vision encoder `{vision_src}` (frozen, feature layer {c.feature_layer}, "
        f"{vlm.vision.num_patches} patches) → `{c.connector}` connector → {_visual_tokens(vlm)} visual tokens per "
        f"image in the sequence of the LM `{lm_src}` (LM trained: {vlm.lm_mode}), prompt layout `{c.layout}`, "
        f"images `{c.resize}` to {vlm.processor.size}px."
    )
    lines += ["", "## Configuration", "", "| setting | value |", "|---|---|"]
    for k, v in dataclasses.asdict(c).items():
        if k not in ("vision", "lm", "tokenizer"):
            lines.append(f"| {k} | {v} |")
    lines += ["", "## Training", ""]
    if vlm.history:
        lines += [
            "| stage | data | records | LM | epochs | lr | global batch | steps | samples | feature cache |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for h in vlm.history:
            cells = [h.get("stage"), ", ".join(h.get("data", []))] + [
                h.get(k, "") for k in ("records", "lm_mode", "epochs", "lr", "global_batch", "step", "samples")
            ]
            lines.append("| " + " | ".join(str(c) for c in cells + [h.get("feature_cache", "")]) + " |")
    else:
        lines.append("No training record (the connector is as initialised, or the model was imported).")
    lines += ["", "## Evaluation", ""]
    if evals:
        lines += ["| data | metric | score | n |", "|---|---|---|---|"]
        for e in evals:
            lines.append(f"| {e['name']} | {e['metric']} | {100 * e['score']:.1f} | {e.get('n', '')} |")
    else:
        lines.append("No evaluation was attached (`vlmforge export --eval REPORT.json`).")
    if fmt == "llava-hf":
        lines += [
            "",
            "## Use",
            "",
            "```python",
            "from transformers import AutoProcessor, LlavaForConditionalGeneration",
            "model = LlavaForConditionalGeneration.from_pretrained(PATH)",
            "processor = AutoProcessor.from_pretrained(PATH)",
            'messages = [{"role": "user", "content": [{"type": "image"},',
            '                                         {"type": "text", "text": "What is shown?"}]}]',
            "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
            'inputs = processor(images=[image], text=prompt, return_tensors="pt")',
            "print(processor.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
            "```",
            "",
            "This is the LLaVA layout vLLM serves (`vllm serve PATH`); see the notes.",
        ]
    elif fmt == "gguf":
        lines += [
            "",
            "## Use",
            "",
            "llama.cpp's GGUF: the LM (LoRA merged, its tokenizer and chat template) in "
            "`lm-TYPE.gguf`, the vision tower and connector (LLaVA's `mlp` projector) in `mmproj-TYPE.gguf`:",
            "",
            "```",
            "llama-mtmd-cli -m PATH/lm-f16.gguf --mmproj PATH/mmproj-f16.gguf --image IMG -p 'What is shown?' --temp 0",
            "llama-server -m PATH/lm-f16.gguf --mmproj PATH/mmproj-f16.gguf",
            "```",
            "",
            "Images are padded to a square with llama.cpp's own colour and resized by it; vlmforge's "
            f"`{c.resize}` may differ for images that are not {vlm.processor.size}px squares.",
        ]
    else:
        lines += [
            "",
            "## Use",
            "",
            "`vlmforge chat --model PATH` or `vlmforge serve --model PATH` (an "
            "OpenAI-compatible server); in Python `vlmforge.model.vlm.VLM.from_pretrained(PATH)`.",
        ]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
