"""Training stages as data: which modules train and at which learning rate.

* `align` (Llama3-V stage 1, LLaVA pretraining): the connector only; encoder and LM frozen.
* `sft` (stage 2, instruction tuning): the connector and the LM, fully or with LoRA (peft).

The vision tower is frozen by default in both, as in the Llama3-V recipe; `vision_mode` trains it
as the Idefics2 ablation and the toolkits do: `full` (nanoVLM, LLaVA-OneVision's
`mm_vision_tower`), `top` (its top `vision_top` blocks and what follows them, ShareGPT4V's
second half, TinyLLaVA's partial tuning) or `lora` (peft adapters on its linear and convolution
layers, Idefics2's "LoRA on both"), with its own learning rate and warm-up. BatchNorm statistics
of a trained conv tower stay frozen unless `vision_bn train` (see `VisionTower.train`).
"""

from __future__ import annotations

from torch import nn

from vlmforge.config import TrainConfig, check_choice
from vlmforge.model.vision import TRAIN_MODES

DEFAULT_LM_MODE = {"align": "frozen", "sft": "full"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lm_mode(cfg: TrainConfig) -> str:
    return cfg.lm_mode or DEFAULT_LM_MODE[cfg.stage]


def vision_lr(cfg: TrainConfig) -> float:
    """The vision tower's peak learning rate: `vision_lr`, default a tenth of the connector's."""
    return cfg.vision_lr if cfg.vision_lr is not None else cfg.lr / 10


def check_vision_mode(cfg: TrainConfig, tower) -> None:
    """Refuse a tower mode this tower cannot take, naming the value and what is allowed."""
    check_choice("vision_mode", cfg.vision_mode, TRAIN_MODES)
    if cfg.vision_mode == "top":
        tower.check_cut(cfg.vision_top)


def stored_cut(cfg: TrainConfig) -> int:
    """The cut of the feature store this stage reads: the top blocks that train from the states
    below them (vision_mode top with a cache), else 0 (the tower's output features)."""
    return cfg.vision_top if cfg.vision_mode == "top" and cfg.cache else 0


def apply_stage(model, cfg: TrainConfig) -> list[dict]:
    """Set requires_grad for the stage and return AdamW parameter groups."""
    check_vision_mode(cfg, model.vision)
    mode = lm_mode(cfg)
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    if mode == "lora" and model.lm_mode != "lora":
        from peft import LoraConfig, get_peft_model

        targets = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.causal_lm.named_modules() if isinstance(m, nn.Linear)}
            & set(LORA_TARGETS)
        )
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets)
        model.lm = get_peft_model(model.lm, lcfg)
    if mode == "full":
        model.causal_lm.requires_grad_(True)
    elif mode == "lora":
        for n, p in model.lm.named_parameters():
            p.requires_grad_("lora_" in n)
    if hasattr(model.lm, "peft_config"):
        model.lm_mode = "lora"
    elif mode == "full":
        model.lm_mode = "full"
    model.vision.set_trainable(cfg.vision_mode, cfg.vision_top, cfg.lora_r, cfg.lora_alpha, cfg.vision_bn == "train")
    return param_groups(model, cfg)


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups of the trainable parameters (built again after FSDP replaces them by shards)."""
    lm_lr = cfg.lm_lr if cfg.lm_lr is not None else cfg.lr / 3
    groups = []
    parts = (("connector", model.connector, cfg.lr), ("lm", model.lm, lm_lr), ("vision", model.vision, vision_lr(cfg)))
    for name, module, lr in parts:
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        other = [p for p in params if p.dim() < 2]
        if decay:
            groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        if other:
            groups.append({"name": name, "params": other, "lr": lr, "weight_decay": 0.0})
    return groups


def trainable_report(model) -> str:
    """A table of what trains: module, trainable and total parameters (the tower's mode beside it)."""
    rows = []
    for name in ("vision", "connector", "lm"):
        module = getattr(model, name)
        total = sum(p.numel() for p in module.parameters())
        train = sum(p.numel() for p in module.parameters() if p.requires_grad)
        rows.append((name, train, total))
    t_all = sum(r[1] for r in rows)
    n_all = sum(r[2] for r in rows)
    lines = [f"{'module':<10} {'trainable':>12} {'total':>12}"]
    lines += [f"{n:<10} {t:>12,} {a:>12,}" + (f"  ({model.vision.mode})" if n == "vision" else "") for n, t, a in rows]
    lines.append(f"{'all':<10} {t_all:>12,} {n_all:>12,}  ({100 * t_all / max(n_all, 1):.1f}% trainable)")
    return "\n".join(lines)
