"""Named model presets (real backbones by Hub id, and the tiny demo model) and `vlmforge plan`:
what a preset costs to train, on paper, with the arithmetic shown.

Each preset names its two checkpoints and connector (the `ModelConfig` it stands for) and keeps
the shapes of those checkpoints, copied from their public `config.json`s, so that parameters,
visual tokens, FLOPs and memory can be computed without downloading anything.

FLOPs per training sample of L tokens (Kaplan et al. 2020; Narayanan et al. 2021), N the LM's
non-embedding parameters: forward 2·N·L; the backward pass to the inputs another 2·N·L (needed
whenever anything before the LM trains, even with the LM frozen); weight gradients 2·N·L more
only for a fully trained LM (LoRA's own are negligible). Causal attention adds 2·layers·L²·d per
pass. The LM head runs on answer tokens only (as `vlmforge` computes it). The frozen encoder
costs 2·P_enc·patches per image and view, forward only: every epoch of every stage without the
feature store, once per image with it. Time = FLOPs / (peak x MFU); the MFU is an assumption,
stated in the output.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from vlmforge.config import ModelConfig, TinySpec, save_json


@dataclass(frozen=True)
class VisionShape:
    hidden: int
    layers: int
    intermediate: int
    image_size: int
    patch_size: int

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def params(self) -> int:  # transformer blocks + patch embedding (heads and norms are small)
        blocks = self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.intermediate)
        return blocks + 3 * self.patch_size**2 * self.hidden

    @property
    def flops(self) -> float:  # forward FLOPs per view: 2 per parameter per patch
        return 2 * self.params * self.patches


@dataclass(frozen=True)
class ConvShape:
    """A convolutional tower's numbers, counted on its transformers class (`conv_shape`): a conv
    reuses each weight at every position of its map, so its FLOPs are not 2·params·tokens."""

    hidden: int  # channels of the stage fed to the connector
    patches: int  # H x W of that stage's map
    params: int
    flops: float  # forward FLOPs per view


def conv_shape(config, image_size: int, feature_layer: int = -1) -> ConvShape:
    """Parameters, FLOPs and the token grid of a conv tower built from `config` on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config).eval()
        x = torch.zeros(1, 3, image_size, image_size)
        with FlopCounterMode(display=False) as counter:
            out = model(pixel_values=x, output_hidden_states=True)
    fmap = out.last_hidden_state if feature_layer == -1 else out.hidden_states[feature_layer]  # [1, C, H, W]
    params = sum(p.numel() for p in model.parameters())
    return ConvShape(fmap.shape[1], fmap.shape[2] * fmap.shape[3], params, float(counter.get_total_flops()))


@functools.cache
def tiny_vision_shape() -> ConvShape:
    """The demo's encoder (`TinySpec`'s ResNet at its resolution, last stage), counted once."""
    spec = TinySpec()
    return conv_shape(spec.resnet_config(), spec.image_size)


@dataclass(frozen=True)
class LMShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def non_embedding(self) -> int:  # q, o: d x d; k, v: d x kv·hd; gate, up, down: d x inter
        d, kv = self.hidden, self.kv_heads * self.head_dim
        return self.layers * (2 * d * d + 2 * d * kv + 3 * d * self.intermediate)

    @property
    def params(self) -> int:
        return self.non_embedding + self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_params(self, r: int) -> int:
        """LoRA of rank r on q, k, v, o, gate, up, down: r x (in + out) each."""
        d, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return self.layers * r * ((d + d) * 2 + (d + kv) * 2 + (d + i) * 3)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    vision: str
    lm: str
    connector: str
    vision_shape: VisionShape | ConvShape | Callable[[], ConvShape]  # a callable: counted when asked
    lm_shape: LMShape
    model: dict = field(default_factory=dict)  # further ModelConfig fields

    @property
    def vshape(self) -> VisionShape | ConvShape:
        return self.vision_shape() if callable(self.vision_shape) else self.vision_shape

    def model_config(self):
        return ModelConfig(vision=self.vision, lm=self.lm, connector=self.connector, **self.model)


SIGLIP_SO400M = VisionShape(hidden=1152, layers=27, intermediate=4304, image_size=384, patch_size=14)
SIGLIP_BASE = VisionShape(hidden=768, layers=12, intermediate=3072, image_size=224, patch_size=16)
CLIP_L_336 = VisionShape(hidden=1024, layers=24, intermediate=4096, image_size=336, patch_size=14)
_TINY = TinySpec()
LLAMA3_8B = LMShape(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
MISTRAL_7B = LMShape(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=32000)
VICUNA_7B = LMShape(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
SMOLLM2_135M = LMShape(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152, tied=True)
# the tiny Llama `vlmforge pretrain` makes (`TinySpec`'s defaults; multi-head attention)
TINY_LM = LMShape(
    _TINY.lm_hidden, _TINY.lm_layers, _TINY.lm_intermediate, _TINY.lm_heads, _TINY.lm_heads, _TINY.vocab_size
)

PRESETS = {
    p.name: p
    for p in [
        Preset(
            "llama3-v",
            "Llama3-V: SigLIP-so400m + Llama-3-8B-Instruct, two self-attention blocks",
            "google/siglip-so400m-patch14-384",
            "meta-llama/Meta-Llama-3-8B-Instruct",
            "attention",
            SIGLIP_SO400M,
            LLAMA3_8B,
        ),
        Preset(
            "idefics2",
            "Idefics2: SigLIP-so400m + Mistral-7B, perceiver resampler of 64 latents",
            "google/siglip-so400m-patch14-384",
            "mistralai/Mistral-7B-v0.1",
            "perceiver",
            SIGLIP_SO400M,
            MISTRAL_7B,
            {"connector_latents": 64, "layout": "inline"},
        ),
        Preset(
            "llava-1.5",
            "LLaVA-1.5: CLIP ViT-L/14-336 (second-to-last layer) + Vicuna-7B, 2-layer MLP",
            "openai/clip-vit-large-patch14-336",
            "lmsys/vicuna-7b-v1.5",
            "mlp",
            CLIP_L_336,
            VICUNA_7B,
            {"feature_layer": -2, "layout": "bare", "resize": "expand"},
        ),
        Preset(
            "smol",
            "SmolVLM-like: SigLIP-base + SmolLM2-135M-Instruct, pixel shuffle x2",
            "google/siglip-base-patch16-224",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "pixel_shuffle",
            SIGLIP_BASE,
            SMOLLM2_135M,
            {"pixel_shuffle_factor": 2},
        ),
        Preset(
            "tiny",
            "the demo's model, made here by `vlmforge pretrain` (no Hub ids)",
            "",
            "",
            "mlp",
            tiny_vision_shape,
            TINY_LM,
            {"vision_pooled": True, "resize": "squash"},
        ),
    ]
}

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, without sparsity.
GPU_PEAK = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l40s": 362e12, "a10g": 125e12}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def with_preset(name: str, model: ModelConfig) -> ModelConfig:
    """The preset's model config, with the fields `model` sets to non-default values on top."""
    base, default = get_preset(name).model_config(), ModelConfig()
    changed = {
        f.name: getattr(model, f.name)
        for f in dataclasses.fields(ModelConfig)
        if getattr(model, f.name) != getattr(default, f.name)
    }
    merged = dataclasses.replace(base, **changed)
    if not merged.vision or not merged.lm:
        raise ValueError(f"preset {name!r} names no backbones here: pass --model.vision and --model.lm")
    return merged


def connector_params_and_tokens(p: Preset) -> tuple[int, int]:
    """Exact, from vlmforge's own connector class built on the meta device (no memory)."""
    import torch

    from vlmforge.config import ModelConfig
    from vlmforge.model.connectors import build_connector

    cfg = dataclasses.replace(ModelConfig(), connector=p.connector, **p.model)
    with torch.device("meta"):
        conn = build_connector(p.connector, p.vshape.hidden, p.lm_shape.hidden, **cfg.connector_settings())
    return sum(t.numel() for t in conn.parameters()), conn.num_tokens(p.vshape.patches + int(cfg.vision_pooled))


def plan(
    preset: str = "llama3-v",
    data_sizes: tuple[int, int] = (600_000, 1_000_000),
    gpu: str = "h100",
    price: float = 2.5,
    mfu: float = 0.4,
    gpus: int = 8,
    text_tokens: tuple[int, int] = (30, 150),
    answer_tokens: tuple[int, int] = (25, 100),
    epochs: tuple[float, float] = (1.0, 1.0),
    sft_lm: str = "lora",
    lora_r: int = 16,
    views: int = 1,
    micro_batch: int = 4,
    runs: int = 1,
    max_slices: int = 0,
    image: tuple[int, int] = (1024, 768),
    out: str | None = None,
) -> dict:
    """A preset's two-stage recipe on paper: visual tokens, parameters, memory per GPU, FLOPs,
    GPU-hours and dollars, with and without the feature store; the arithmetic is printed.

    Args:
        preset: a preset name (`vlmforge presets`).
        data_sizes: samples of stage 1 (image-text pairs) and stage 2 (instructions).
        gpu: h100, h200, a100, l40s or a10g (dense bf16 peak from the data sheet).
        price: dollars per GPU-hour.
        mfu: model FLOPs utilisation assumed (0-1).
        gpus: GPUs of the job (memory per GPU with FSDP; wall time).
        text_tokens: text tokens of a stage 1 and a stage 2 sample.
        answer_tokens: of those, the tokens trained on (the answer) in stage 1 and stage 2.
        epochs: epochs of stage 1 and stage 2.
        sft_lm: how stage 2 trains the LM: lora or full.
        lora_r: the LoRA rank.
        views: views per image (5 with 2x2 image splitting).
        micro_batch: samples per GPU per forward (activation memory).
        runs: training runs that reuse one feature store (ablations, reruns).
        max_slices: adaptive slicing's budget (`--model.slicing adaptive`): the views then come
            from LLaVA-UHD's grid for `image` at the encoder's resolution.
        image: a typical image's width and height for adaptive slicing.
        out: also write the figures to this JSON file.
    """
    if gpu not in GPU_PEAK:
        raise ValueError(f"unknown gpu {gpu!r}; known: {', '.join(GPU_PEAK)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if sft_lm not in ("lora", "full"):
        raise ValueError(f"sft_lm is lora or full, got {sft_lm!r}")
    p = get_preset(preset)
    views, slicing = _adaptive_views(p, image, max_slices) if max_slices else (views, None)
    conn_params, tokens_per_view = connector_params_and_tokens(p)
    visual = tokens_per_view * views
    stages = {
        name: _stage(
            p,
            conn_params,
            visual,
            views,
            lm_mode,
            text_tokens[i],
            answer_tokens[i],
            data_sizes[i],
            epochs[i],
            lora_r,
            micro_batch,
            gpus,
        )
        for i, (name, lm_mode) in enumerate((("align", "frozen"), ("sft", sft_lm)))
    }
    v, lm = p.vshape, p.lm_shape
    r = {
        "preset": p.name,
        "description": p.description,
        "vision": p.vision or "(built locally)",
        "lm": p.lm or "(built locally)",
        "connector": p.connector,
        "visual_tokens_per_image": visual,
        "views_per_image": views,
        "slicing": slicing,
        "params": {"vision": v.params, "connector": conn_params, "lm": lm.params, "lm_non_embedding": lm.non_embedding},
        "gpu": gpu,
        "peak_flops": GPU_PEAK[gpu],
        "mfu": mfu,
        "price_per_gpu_hour": price,
        "gpus": gpus,
        "runs": runs,
        "stages": stages,
    }
    for cached in (False, True):
        r["with_feature_cache" if cached else "without_feature_cache"] = _run_cost(
            stages, cached, runs, GPU_PEAK[gpu] * mfu, price, gpus
        )
    r["under_500_dollars"] = r["without_feature_cache"]["dollars_per_run"] < 500
    print(format_plan(r))
    if out:
        save_json(r, out)
    return r


def _adaptive_views(p: Preset, image: tuple[int, int], max_slices: int) -> tuple[int, str]:
    """Views of a typical image under adaptive slicing at the preset's resolution, and the words."""
    from vlmforge.data.images import adaptive_grid

    res = getattr(p.vshape, "image_size", None)
    if res is None:
        raise ValueError(f"preset {p.name}: its encoder's resolution is not known here; give --views instead")
    rows, cols = adaptive_grid(image[0], image[1], res, max_slices)
    whole = f"a {image[0]} x {image[1]} image"
    if rows:
        return rows * cols + 1, f"adaptive: {rows} x {cols} slices + the whole image for {whole}"
    return 1, f"adaptive: {whole} fits one {res} px view, no slices"


def _stage(
    p: Preset,
    conn_params: int,
    visual: int,
    views: int,
    lm_mode: str,
    text_tokens: int,
    answer_tokens: int,
    data_size: int,
    epochs: float,
    lora_r: int,
    micro_batch: int,
    gpus: int,
) -> dict:
    """One stage's samples, trainable parameters, FLOPs (LM, head, connector; the encoder apart)
    and memory per GPU."""
    v, lm = p.vshape, p.lm_shape
    n, d, layers = lm.non_embedding, lm.hidden, lm.layers
    length = visual + text_tokens
    passes = {"frozen": 2, "lora": 2, "full": 3}[lm_mode]  # forward, input grads, weight grads
    lm_flops = passes * (2 * n * length + 2 * layers * length * length * d)
    head = 3 * 2 * lm.vocab * d * answer_tokens  # on answer tokens, forward and backward
    conn = 6 * conn_params * visual
    samples = data_size * epochs
    trainable = conn_params + {"frozen": 0, "lora": lm.lora_params(lora_r), "full": lm.params}[lm_mode]
    enc_per_image = v.flops * views
    return {
        "samples": samples,
        "lm": lm_mode,
        "tokens_per_sample": length,
        "trainable_params": trainable,
        "flops_per_sample": lm_flops + head + conn,
        "encoder_flops_per_sample": enc_per_image,
        "flops": samples * (lm_flops + head + conn),
        "encoder_flops_every_epoch": samples * enc_per_image,
        "encoder_flops_cached": data_size * enc_per_image,  # once per image, reused by epochs and runs
        "memory_gb": _memory(lm, v, conn_params, trainable, lm_mode, length, micro_batch, gpus),
    }


def _run_cost(stages: dict, cached: bool, runs: int, flops_per_s: float, price: float, gpus: int) -> dict:
    """FLOPs, GPU-hours and dollars of one run, the encoder's share once per image when cached."""
    total = 0.0
    for s in stages.values():
        total += s["flops"] + (s["encoder_flops_cached"] / runs if cached else s["encoder_flops_every_epoch"])
    hours = total / flops_per_s / 3600
    return {
        "flops_per_run": total,
        "gpu_hours_per_run": hours,
        "dollars_per_run": hours * price,
        "wall_hours_per_run_on_gpus": hours / gpus,
    }


def _memory(
    lm: LMShape, v: VisionShape, conn: int, trainable: int, lm_mode: str, length: int, micro_batch: int, gpus: int
) -> dict:
    """GB per GPU, bf16 weights: frozen weights 2 B/param; trainable ones 2 (weight) + 4 (fp32 master)
    + 8 (AdamW) + 2 (grad) B; activations by Korthikanti et al. (2022) without recomputation,
    L·d·(34 + 5·heads·L/d) bytes per layer and sample, or ~2·L·d·layers with full checkpointing."""
    frozen_lm = 0 if lm_mode == "full" else lm.params
    weights = 2 * (frozen_lm + v.params) + 16 * trainable
    act = micro_batch * lm.layers * length * lm.hidden * (34 + 5 * lm.heads * length / lm.hidden)
    ckpt = micro_batch * lm.layers * length * lm.hidden * 2
    gb = 1e9
    return {
        "weights_and_optimizer_ddp": round(weights / gb, 1),
        "weights_and_optimizer_fsdp": round(weights / gpus / gb, 1),
        "weights_without_encoder_ddp": round((weights - 2 * v.params) / gb, 1),  # with the feature store
        "activations": round(act / gb, 1),
        "activations_checkpointed": round(ckpt / gb, 1),
    }


def format_plan(r: dict) -> str:
    def big(x: float, units=(("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6))) -> str:
        for unit, f in units:
            if abs(x) >= f:
                return f"{x / f:.2f}{unit}"
        return f"{x:.0f}"

    def count(x: float) -> str:
        return big(x, (("B", 1e9), ("M", 1e6), ("K", 1e3)))

    pr = r["params"]
    lines = [
        f"preset {r['preset']}: {r['description']}",
        f"  vision {r['vision']}, LM {r['lm']}, connector {r['connector']}",
        f"  parameters: vision {count(pr['vision'])}, connector {count(pr['connector'])}, LM {count(pr['lm'])} "
        f"({count(pr['lm_non_embedding'])} non-embedding); visual tokens per image {r['visual_tokens_per_image']}"
        + (f" ({r['views_per_image']} views; {r['slicing']})" if r.get("slicing") else ""),
        f"  {r['gpus']} x {r['gpu']} at {big(r['peak_flops'])}FLOP/s bf16 peak, assumed MFU {r['mfu']:.0%}, "
        f"${r['price_per_gpu_hour']}/GPU-hour",
        "",
    ]
    for name, s in r["stages"].items():
        m = s["memory_gb"]
        lines += [
            f"  stage {name} (LM {s['lm']}): {s['samples']:,.0f} samples x {s['tokens_per_sample']} tokens; "
            f"trainable {count(s['trainable_params'])}",
            f"    FLOPs/sample: LM+connector {big(s['flops_per_sample'])} + encoder "
            f"{big(s['encoder_flops_per_sample'])} -> stage {big(s['flops'])} + encoder "
            f"{big(s['encoder_flops_every_epoch'])} (with the store: {big(s['encoder_flops_cached'])} once per image)",
            f"    memory/GPU: weights+optimizer {m['weights_and_optimizer_ddp']} GB (DDP), "
            f"{m['weights_and_optimizer_fsdp']} GB (FSDP over {r['gpus']}), {m['weights_without_encoder_ddp']} GB "
            f"without the encoder (feature store); activations {m['activations']} GB per micro-batch "
            f"({m['activations_checkpointed']} GB checkpointed)",
        ]
    lines.append("")
    for key, label in (("without_feature_cache", "re-encoding"), ("with_feature_cache", "feature store")):
        c = r[key]
        wall = f"{c['wall_hours_per_run_on_gpus']:.1f} h on {r['gpus']} GPUs"
        lines.append(
            f"  total ({label}): {big(c['flops_per_run'])}FLOP / ({big(r['peak_flops'])}FLOP/s x "
            f"{r['mfu']}) / 3600 = {c['gpu_hours_per_run']:.1f} GPU-hours x ${r['price_per_gpu_hour']} "
            f"= ${c['dollars_per_run']:.0f} ({wall})"
        )
    lines.append("  (the store saves encoder work when epochs > 1 or several runs share it: --epochs, --runs)")
    lines.append(
        f"  under $500: {'yes' if r['under_500_dollars'] else 'no'} "
        f"(${r['without_feature_cache']['dollars_per_run']:.0f} at the assumptions above)"
    )
    return "\n".join(lines)


def describe(p: Preset) -> str:
    _, tokens = connector_params_and_tokens(p)
    size = f"{p.lm_shape.params / 1e9:.2f}B" if p.lm_shape.params > 1e9 else f"{p.lm_shape.params / 1e6:.0f}M"
    return f"{p.name:<10} {p.connector:<13} {tokens:>4} tokens/image  LM {size:>6}  {p.description}"


def show_presets(show: str | None = None) -> None:
    """List the model presets (real backbones by Hub id, and the tiny demo model).

    Args:
        show: print this preset's model config as YAML, for `vlmforge train --config FILE`.
    """
    import yaml

    if show:
        print(yaml.safe_dump({"model": dataclasses.asdict(get_preset(show).model_config())}, sort_keys=False))
        return
    for p in PRESETS.values():
        print(describe(p))
