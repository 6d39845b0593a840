"""`vlmforge export`: one model folder written in the format asked for (or the best one that fits,
`auto`), atomically, with its model card; each format's writer lives in its own module
(`llava.py`, `gguf.py`; vlmforge's own is a copy of the folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vlmforge.eval.reports import read_evals
from vlmforge.export.card import model_card
from vlmforge.export.errors import ExportError
from vlmforge.export.llava import IDEFICS2_REASON, llava_obstacles, to_llava
from vlmforge.io import atomic_dir, atomic_write_text
from vlmforge.model import folder

FORMATS = ("auto", "llava-hf", "idefics2-hf", "vlmforge", "gguf")


def export(
    model: str, out: str, format: str = "auto", eval: list[str] | None = None, gguf_type: str = "f16"
) -> tuple[str, list[str]]:
    """Write a model for the rest of the ecosystem, with a model card (README.md).

    `llava-hf` is transformers' `LlavaForConditionalGeneration` + `AutoProcessor` (what vLLM
    serves): models with the `mlp` or `linear` connector, no image splitting. Other connectors
    (`attention`, `perceiver`, `pixel_shuffle`) have no transformers class and are written in
    vlmforge's own format; `auto` picks llava-hf when the model maps onto it and says why not
    otherwise. `gguf` writes llama.cpp's two files: the LM (Llama architecture, byte-level BPE
    tokenizer) with its tokenizer and chat template, and the vision tower (SigLIP or CLIP ViT) with
    the `mlp` connector as the `--mmproj` projector file; other towers and connectors are refused
    with the reason. LoRA adapters are merged into the LM on the way out. Returns (format written,
    notes).

    Args:
        model: vlmforge model folder.
        out: output folder (written atomically; must not be --model).
        format: auto, llava-hf, idefics2-hf (refused, with the reason), vlmforge or gguf.
        eval: `vlmforge eval` report files whose scores go into the model card.
        gguf_type: tensor type of a gguf export: f32, f16, bf16 or q8_0 (norms stay f32).
    """
    fmt, notes = _export(model, out, format, eval, gguf_type)
    for n in notes:
        print(f"note: {n}")
    print(f"exported as {fmt} to {out} (model card: {Path(out) / 'README.md'})")
    return fmt, notes


def _export(model: str, out: str, fmt: str, evals: list[str] | None, gguf_type: str) -> tuple[str, list[str]]:
    from vlmforge.model.vlm import VLM

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (use {', '.join(FORMATS)})")
    if Path(out).resolve() == Path(model).resolve():
        raise ValueError("--out must differ from --model")
    scores = read_evals(evals or [])
    vlm = VLM.from_pretrained(model)
    vlm.vision_source = str(folder.vision_dir(model))
    meta = folder.read_meta(model)
    sources = (meta["model"].get("vision", ""), meta["model"].get("lm", ""))
    notes: list[str] = []
    if fmt == "idefics2-hf":
        raise ExportError(IDEFICS2_REASON)
    if fmt == "auto":
        problems = llava_obstacles(vlm)
        fmt = "vlmforge" if problems else "llava-hf"
        if problems:
            notes.append("written in vlmforge's own format, not llava-hf: " + "; ".join(problems))
    if fmt == "gguf":
        from vlmforge.export.gguf import mmproj_obstacles, write_lm, write_mmproj

        problems = mmproj_obstacles(vlm)
        if problems:
            raise ExportError("cannot export to gguf: " + "; ".join(problems))
        if hasattr(vlm.lm, "merge_and_unload"):
            notes.append(f"{vlm.merge_lora()} LoRA layers merged into the LM")
        with atomic_dir(out) as tmp:
            write_lm(vlm, tmp / f"lm-{gguf_type}.gguf", gguf_type)
            write_mmproj(vlm, tmp / f"mmproj-{gguf_type}.gguf", gguf_type)
            atomic_write_text(tmp / "README.md", model_card(vlm, fmt, scores, notes, sources))
        return fmt, notes
    if fmt == "llava-hf":
        hf, processor, more = to_llava(vlm)
        notes += more
        with atomic_dir(out) as tmp:
            hf.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["vlmforge"] = {"model": meta["model"], "history": vlm.history}  # for `vlmforge import`
            atomic_write_text(tmp / "config.json", json.dumps(cfg, indent=2) + "\n")
            atomic_write_text(tmp / "README.md", model_card(vlm, fmt, scores, notes, sources))
        return fmt, notes
    with atomic_dir(out) as tmp:
        for item in Path(model).iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        atomic_write_text(tmp / "README.md", model_card(vlm, fmt, scores, notes, sources))
    return fmt, notes
