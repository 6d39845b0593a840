"""A vlmforge model as llama.cpp's two GGUF files: the LM, and the vision tower + connector as
the projector file llama.cpp's multimodal runtime (libmtmd) loads with `--mmproj`.

Both are written with the `gguf` package (llama.cpp's own Python writer). The LM the way llama.cpp's
`convert_hf_to_gguf.py` writes a Llama-family checkpoint: tensor names from `gguf`'s name map,
the query and key projections permuted to llama.cpp's rotary layout, the hyperparameters under
`llama.*`, and the tokenizer as a `gpt2`-model BPE (its tokens, their types, the merges, the special
token ids, the pre-tokenizer's llama.cpp name and the chat template). The projector file as
llama.cpp's LLaVA projector (`clip.projector_type mlp`): a SigLIP or CLIP ViT under `v.*`, the
`mlp` connector as `mm.0` / `mm.2`, the image settings and the feature layer. Anything that does
not map exactly (other LM architectures or tokenizers, conv towers, other connectors, the pooled
token, image splitting) is refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vlmforge.config import check_choice

# The pre-tokenizers llama.cpp names (`tokenizer.ggml.pre`), as they appear in a tokenizer.json.
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


class GGUFError(ValueError):
    """The model cannot be written as GGUF; the message says why."""


def tokenizer_pre(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, or a `GGUFError`."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    split = next((p for p in parts if p.get("type") == "Split"), {})
    if split.get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise GGUFError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) has no llama.cpp name known to vlmforge")


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotary layout (halves) to llama.cpp's (interleaved pairs), as convert_hf_to_gguf does."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _writer(path: str | Path, arch, ftype: str):
    """A `gguf.GGUFWriter` for `path` with its name and file type set, after checking `ftype`."""
    import gguf

    check_choice("GGUF type", ftype, GGUF_TYPES, GGUFError)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(Path(str(path)).stem)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[ftype]
    )
    return writer


def _add(writer, name: str, w: torch.Tensor, ftype: str, keep_f32: bool = False) -> None:
    """One tensor in the file's type; vectors (norms, biases) and `keep_f32` ones stay float32."""
    import gguf

    data = w.detach().float().cpu().numpy()
    if data.ndim != 2 or keep_f32 or ftype == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif ftype == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        kind = gguf.GGMLQuantizationType.BF16 if ftype == "bf16" else gguf.GGMLQuantizationType.Q8_0
        q = gguf.quants.quantize(data, kind)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=kind)


def _close(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _vocab(tokenizer, size: int) -> tuple[list[str], list[int]]:
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_lm(vlm, path: str | Path, ftype: str = "f16") -> dict:
    """Write `vlm`'s LM (LoRA merged) and tokenizer to the GGUF file `path`; returns a summary."""
    import gguf

    lm = vlm.causal_lm
    cfg = lm.config
    if cfg.model_type != "llama":
        raise GGUFError(f"the LM is a {cfg.model_type!r} model: GGUF export writes Llama-architecture LMs only")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise GGUFError(f"the LM's rope scaling {rope} is not written here")
    theta = rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    pre = tokenizer_pre(vlm.tokenizer)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    state = {k: v.detach().float().cpu() for k, v in lm.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent
    vocab = state["model.embed_tokens.weight"].shape[0]
    writer = _writer(path, gguf.MODEL_ARCH.LLAMA, ftype)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(vocab)
    tokens, types = _vocab(vlm.tokenizer, vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = json.loads(vlm.tokenizer.backend_tokenizer.to_str())["model"].get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    tok = vlm.tokenizer
    for kind, token in (("bos", tok.bos_token), ("eos", tok.eos_token), ("pad", tok.pad_token)):
        if token is not None:
            getattr(writer, f"add_{kind}_token_id")(tok.convert_tokens_to_ids(token))
    writer.add_add_bos_token(False)  # vlmforge's prompts carry their own begin-of-text (the chat template's)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
    for name, w in state.items():
        if name.endswith(("rotary_emb.inv_freq",)):
            continue
        if name.endswith("self_attn.q_proj.weight"):
            w = permute(w, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = permute(w, kv_heads)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFError(f"the LM's tensor {name} has no GGUF name")
        _add(writer, new, w, ftype)
    _close(writer)
    return {"file": str(path), "type": ftype, "tensors": len(state), "vocab": vocab, "pre": pre}


def mmproj_obstacles(vlm) -> list[str]:
    """Why the vision tower and connector cannot be llama.cpp's `mlp` (LLaVA) projector file."""
    c, v = vlm.config, vlm.vision
    kind = getattr(v.model.config, "model_type", "")
    problems = []
    if kind not in ("siglip_vision_model", "clip_vision_model"):
        problems.append(f"vision tower {type(v.model).__name__}: llama.cpp's clip runs SigLIP and CLIP ViTs only")
    if c.connector != "mlp":
        problems.append(f"connector {c.connector!r}: llama.cpp's `mlp` projector is Linear-GELU-Linear (`mlp`)")
    if c.vision_pooled:
        problems.append("the pooled token (vision_pooled): llama.cpp's clip has no attention-pool output")
    if c.split_grid or c.slicing == "adaptive":
        problems.append("image splitting: not written (llama.cpp's `mlp` projector encodes the whole image)")
    if c.resize == "native":
        problems.append("resize native: llama.cpp's `mlp` projector resizes every image to one square")
    if c.architecture != "autoregressive":
        problems.append("the cross-attention architecture: llama.cpp puts visual tokens in the LM's sequence")
    if not getattr(v.model.config, "hidden_act", "").startswith(("gelu", "quick_gelu")):
        problems.append(f"activation {v.model.config.hidden_act!r} of the tower")
    return problems


def write_mmproj(vlm, path: str | Path, ftype: str = "f16") -> dict:
    """Write the vision tower and the `mlp` connector as llama.cpp's projector file (`--mmproj`):
    `clip.projector_type mlp` (LLaVA's), the ViT under `v.*`, the connector as `mm.0` / `mm.2`,
    the image size, patch size, mean and std, and the feature layer the connector reads."""
    import gguf

    problems = mmproj_obstacles(vlm)
    if problems:
        raise GGUFError("cannot write llama.cpp's projector file: " + "; ".join(problems))
    tower, vcfg, proc = vlm.vision, vlm.vision.model.config, vlm.processor
    layers = vcfg.num_hidden_layers
    fl = tower.feature_layer  # -1: after the final norm; else hidden_states[k] (no norm)
    after = layers if fl == -1 else (fl if fl >= 0 else layers + fl + 1)  # blocks run before the features
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, layers)
    writer = _writer(path, gguf.MODEL_ARCH.MMPROJ, ftype)
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_image_size(tower.image_size)
    writer.add_vision_patch_size(tower.patch_size)
    writer.add_vision_embedding_length(vcfg.hidden_size)
    writer.add_vision_feed_forward_length(vcfg.intermediate_size)
    writer.add_vision_block_count(layers)
    writer.add_vision_head_count(vcfg.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vcfg.layer_norm_eps)
    writer.add_vision_projection_dim(vlm.causal_lm.config.hidden_size)
    writer.add_vision_image_mean(list(proc.mean))
    writer.add_vision_image_std(list(proc.std))
    writer.add_vision_use_gelu(vcfg.hidden_act.startswith("gelu"))  # else CLIP's quick GELU
    writer.add_array("clip.vision.feature_layer", [after])
    tensors = {
        "vision_tower.vision_model." + k: v
        for k, v in tower.model.state_dict().items()
        if not k.startswith("head.") and not (fl != -1 and k.startswith("post_layernorm."))
    }
    first, second = vlm.connector.linears()
    mm = {"mm.0.weight": first.weight, "mm.0.bias": first.bias, "mm.2.weight": second.weight, "mm.2.bias": second.bias}
    for name, w in list(tensors.items()) + list(mm.items()):
        new = name if name.startswith("mm.") else names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFError(f"the vision tensor {name} has no GGUF name")
        _add(writer, new, w, ftype, keep_f32="position_embd" in new)  # the conv (4-D) stays f32 too
    _close(writer)
    return {"file": str(path), "type": ftype, "tensors": len(tensors) + 4, "feature_after_blocks": after}
