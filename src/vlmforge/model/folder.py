"""The vlmforge model folder: the only code that knows its layout.

    config.json             {"vlmforge": version, "model": the ModelConfig, "lm_mode", "tokens_per_image",
                             "history": the training stages that made it, and any extra keys}
    vision/                 the vision tower and its image processor (`save_pretrained`)
    lm/                     the causal LM and its tokenizer (`save_pretrained`)
    lm_adapter/             LoRA adapters (peft), when the LM was tuned with LoRA
    connector.safetensors   the connector's weights

`VLM.save_pretrained` / `VLM.from_pretrained` write and read it through these functions; so do
export, import, the cache builder and `merge-lora`.
"""

from __future__ import annotations

from pathlib import Path

from vlmforge.io import read_json, write_json

META, VISION, LM, ADAPTER, CONNECTOR = "config.json", "vision", "lm", "lm_adapter", "connector.safetensors"
CORE_KEYS = ("vlmforge", "model", "lm_mode", "tokens_per_image", "history")


def vision_dir(path: str | Path) -> Path:
    return Path(path) / VISION


def lm_dir(path: str | Path) -> Path:
    """The LM's folder, which holds the tokenizer too."""
    return Path(path) / LM


def adapter_dir(path: str | Path) -> Path:
    return Path(path) / ADAPTER


def has_adapter(path: str | Path) -> bool:
    return adapter_dir(path).is_dir()


def read_meta(path: str | Path) -> dict:
    """The folder's config.json, or an error saying the folder is not a vlmforge model."""
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a vlmforge model (no {META})")
    meta = read_json(meta_file, "model config")
    if not isinstance(meta, dict) or "vlmforge" not in meta or "model" not in meta:
        raise ValueError(f"{meta_file}: not a vlmforge model config")
    return meta


def model_settings(path: str | Path) -> dict:
    """The saved ModelConfig of the folder, as a dict."""
    return read_meta(path)["model"]


def extra_meta(path: str | Path) -> dict:
    """The keys of config.json beyond the model's own (what a tool added, e.g. `merged_from`)."""
    return {k: v for k, v in read_meta(path).items() if k not in CORE_KEYS}


def write_meta(
    folder: str | Path,
    model: dict,
    lm_mode: str,
    tokens_per_image: int | None,
    history: list,
    extra: dict | None = None,
) -> None:
    meta = {
        "vlmforge": __import__("vlmforge").__version__,
        "model": model,
        "lm_mode": lm_mode,
        "tokens_per_image": tokens_per_image,
        "history": history,
        **(extra or {}),
    }
    write_json(Path(folder) / META, meta, indent=2)


def record_evals(folder: str | Path, evals: list[dict]) -> None:
    """Put eval scores (`[{"task", "metric", "score", "n"}]`) into a model folder's config.json,
    where its card (the server's playground, `export`) finds them."""
    meta = read_meta(folder)
    meta["evals"] = evals
    write_json(Path(folder) / META, meta, indent=2)


def read_connector(path: str | Path, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / CONNECTOR), device=device)


def write_connector(folder: str | Path, state: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(Path(folder) / CONNECTOR))
