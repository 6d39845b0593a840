"""The vision tower: any HF vision encoder, loaded like a Hub checkpoint, returning patch features.

Dual-encoder checkpoints (SigLIP, CLIP) are loaded through their vision-only classes so the text
tower is never materialised. `feature_layer=-1` takes the last hidden state (after the encoder's
final norm, as Idefics2 does); other values index `hidden_states` (LLaVA uses -2). A CLS token, if
the encoder has one, is dropped so that only patch features remain.

Convolutional and hybrid towers (ResNet, ConvNeXt, RegNet, MobileNet, EfficientNet, MobileViT…:
any class whose outputs are feature maps [N, C, H, W]) work the same way, as ConvLLaVA, FastVLM
and OpenCLIP's ConvNeXt towers use them: `feature_layer` picks a stage of `hidden_states` (-1 the
last), and the map becomes H x W visual tokens in row-major order. Their grid and width are read
from one probe forward at the input size, since they depend on the stage and the resolution.
Inputs of other sizes than the tower's own (`resize native`): a conv tower takes them as they
are; a ViT interpolates its position embeddings to the input's patch grid (transformers'
`interpolate_pos_encoding`, which SigLIP and CLIP have). Patch features keep row-major order.
A frozen tower stays in eval mode whatever the rest of the model does, so BatchNorm statistics
never move. A tower that trains (`set_trainable`: all of it, its top blocks, or LoRA adapters)
keeps its BatchNorm layers in eval mode too unless told to train their statistics: a frozen
statistic is what a small fine-tuning batch cannot estimate well, and it keeps training and
inference (and a resumed run) on the same normalisation.
"""

from __future__ import annotations

import hashlib
import inspect
import math

import torch
from torch import nn

from vlmforge import runtime
from vlmforge.config import check_choice
from vlmforge.io import unusable

# How a tower can train (`VisionTower.set_trainable`).
TRAIN_MODES = ("frozen", "full", "top", "lora")


class _Cut(Exception):
    """Stops a forward pass at a cut (`VisionTower.below`)."""


# Vision-only classes of dual-encoder checkpoints, by the checkpoint's model_type.
_VISION_CLASSES = {
    "siglip": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
    "clip": "CLIPVisionModel",
}


def vision_core(model: nn.Module) -> nn.Module:
    """The vision transformer of an HF vision model (some classes wrap it as `vision_model`)."""
    return getattr(model, "vision_model", model)


def check_loading_info(path: str, info: dict) -> None:
    """Refuse a checkpoint that leaves weights uninitialised (wrong architecture or a broken file)."""
    missing = [k for k in info.get("missing_keys", []) if "rotary" not in k]
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise ValueError(f"{path}: {len(missing)} weights missing from the checkpoint (e.g. {shown})")


@runtime.quiet_libraries()
def load_vision_model(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the vision part of `path` (Hub id or folder) with `from_pretrained`."""
    import transformers
    from transformers import AutoConfig, AutoModel

    what = "a vision encoder"
    try:
        config = AutoConfig.from_pretrained(path)
        cls_name = _VISION_CLASSES.get(config.model_type)
        cls = getattr(transformers, cls_name) if cls_name else AutoModel
        model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise unusable(path, what, e) from e
    check_loading_info(path, info)
    model = vision_core(model) if cls_name is None else model
    if "pixel_values" not in inspect.signature(model.forward).parameters:
        raise unusable(path, what, f"a {config.model_type!r} checkpoint ({type(model).__name__}) takes no images")
    return model


def is_vit(config) -> bool:
    """A plain ViT config (fixed patch grid, one width); conv and hybrid towers are not."""
    cfg = getattr(config, "vision_config", config)
    return all(isinstance(getattr(cfg, k, None), int) for k in ("hidden_size", "image_size", "patch_size"))


def by_shape(items: list[torch.Tensor], fn) -> list[torch.Tensor]:
    """`fn` over `items` (tensors [n_i, ...]) batched by shape: the items of one shape are
    concatenated, run once, and split back into one output [n_i, ...] per item, in order."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(items):
        groups.setdefault((x.dim(), *x.shape[1:]), []).append(i)
    out: list = [None] * len(items)
    for idx in groups.values():
        result = fn(torch.cat([items[i] for i in idx]))
        for i, part in zip(idx, result.split([items[i].shape[0] for i in idx])):
            out[i] = part
    return out


class VisionTower(nn.Module):
    """Wraps an HF vision model; `forward` maps pixels [N, 3, H, W] to patch features [N, P, Dv].

    `image_size`: input resolution of a conv or hybrid tower (a ViT's is fixed by its config);
    `VisionTower.from_pretrained` takes it from the checkpoint's image processor."""

    def __init__(self, model: nn.Module, feature_layer: int = -1, pooled: bool = False, image_size: int | None = None):
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        self.pooled = pooled
        cfg = getattr(model.config, "vision_config", model.config)
        self.convolutional = not is_vit(model.config)
        if self.convolutional:
            size = image_size or getattr(cfg, "image_size", None)
            if not isinstance(size, int):
                raise ValueError(f"{type(model).__name__}: the input resolution is unknown; pass image_size")
            self.image_size = size
            self.grid, self.hidden_size = self._probe()
            self.num_patches = self.grid[0] * self.grid[1]
            self.patch_size = size // self.grid[0]  # the stage's stride in pixels
        else:
            if image_size not in (None, cfg.image_size):
                raise ValueError(f"image_size {image_size} differs from the encoder's {cfg.image_size}")
            self.hidden_size = cfg.hidden_size
            self.image_size = cfg.image_size
            self.patch_size = cfg.patch_size
            side = cfg.image_size // cfg.patch_size
            self.grid = (side, side)
            self.num_patches = side * side
        # the encoder's pooled embedding (SigLIP's attention-pool head) as one extra leading feature
        self.num_features = self.num_patches + int(pooled)
        # a ViT that can encode other sizes than its own (transformers' `interpolate_pos_encoding`)
        self.interpolates = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self.released = False
        core = vision_core(model)
        if not pooled and getattr(core, "use_head", False):
            core.use_head = False  # SigLIP's attention-pool head: its output is unused unless pooled (its weights stay)
        self._fingerprint: dict[int, str] = {}  # by cut (`fingerprint`)
        self.mode = "frozen"  # how it trains (`set_trainable`)
        self.top = 0  # the blocks that train with mode `top`
        self.bn_train = False
        # image features handed to the model are the states below the top `from_states` blocks
        # (a feature store of that cut): the model runs only those blocks on them (`above`)
        self.from_states = 0
        self._bottoms: dict[int, list[str]] = {}

    @torch.no_grad()
    def _probe(self) -> tuple[tuple[int, int], int]:
        """(grid (H, W), channels) of the selected stage, from one forward of a blank image."""
        p = next(self.model.parameters())
        was = self.model.training
        self.model.eval()  # a probe must not move BatchNorm statistics
        try:
            x = torch.zeros(1, 3, self.image_size, self.image_size, dtype=p.dtype, device=p.device)
            feats = self._select(self.model(pixel_values=x, output_hidden_states=self.feature_layer != -1))
        finally:
            self.model.train(was)
        if feats.dim() == 4:  # [1, C, H, W]
            return (feats.shape[2], feats.shape[3]), feats.shape[1]
        if feats.dim() == 3:  # a hybrid that already returns tokens [1, P, C]
            return (1, feats.shape[1]), feats.shape[2]
        raise ValueError(f"{type(self.model).__name__}: stage {self.feature_layer} is not a feature map or tokens")

    def _select(self, out) -> torch.Tensor:
        """The features of `feature_layer` from a model output."""
        if self.feature_layer == -1:
            return out.last_hidden_state
        states = out.hidden_states
        if not -len(states) <= self.feature_layer < len(states):
            raise ValueError(
                f"feature_layer {self.feature_layer} is out of range: this encoder has {len(states)} hidden states"
            )
        return states[self.feature_layer]

    def train(self, mode: bool = True) -> VisionTower:
        """A frozen tower stays in eval mode (no BatchNorm update, no dropout) while the rest trains;
        a trained one keeps its BatchNorm statistics frozen unless `bn_train`."""
        trainable = any(p.requires_grad for p in self.parameters())
        super().train(mode and trainable)
        if not self.bn_train:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if self.top:  # what lies below the trained blocks is frozen whole: its statistics too
            for name in self.bottom(self.top):
                self.model.get_submodule(name).eval()
        return self

    def bottom(self, top: int) -> list[str]:
        """Names of the modules (with weights or buffers of their own) that run below the top `top`
        blocks: the embeddings, the lower blocks and anything between them (CLIP's pre-norm), in
        the order one forward of a blank image calls them."""
        if top not in self._bottoms:
            self.check_cut(top)
            first = self.blocks[len(self.blocks) - top]
            names = {m: n for n, m in self.model.named_modules()}
            inside = set(first.modules())
            order: list[str] = []

            def note(module, args):
                if module in inside:
                    raise _Cut
                own = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(False))
                if own and names[module] not in order:
                    order.append(names[module])

            hooks = [m.register_forward_pre_hook(note) for m in names]
            p, was = next(self.model.parameters()), self.model.training
            self.model.eval()  # a probe must not move BatchNorm statistics
            try:
                with torch.no_grad():
                    self.model(
                        pixel_values=torch.zeros(1, 3, self.image_size, self.image_size, dtype=p.dtype, device=p.device)
                    )
            except _Cut:
                pass
            finally:
                self.model.train(was)
                for h in hooks:
                    h.remove()
            self._bottoms[top] = order
        return self._bottoms[top]

    @property
    def blocks(self) -> list[nn.Module]:
        """The tower's repeated blocks, bottom to top: a ViT's transformer layers, a conv tower's stages."""
        encoder = getattr(vision_core(self.model), "encoder", None)
        return list(getattr(encoder, "layers", None) or getattr(encoder, "stages", None) or [])

    def set_trainable(
        self, mode: str, top: int = 1, lora_r: int = 16, lora_alpha: int = 32, bn_train: bool = False
    ) -> None:
        """Which of the tower's weights train: `frozen` none; `full` all; `top` the top `top` blocks
        and everything after them (final norm, pooling head), the embeddings and lower blocks frozen;
        `lora` peft adapters (rank `lora_r`) on every linear and convolution layer, the weights
        frozen (the adapters are folded in when the model is saved). `bn_train`: BatchNorm
        statistics move while it trains."""
        check_choice("vision_mode", mode, TRAIN_MODES)
        if mode == "top":
            self.check_cut(top)
        self.mode, self.top, self.bn_train = mode, top if mode == "top" else 0, bn_train
        self.requires_grad_(False)
        if mode == "full":
            self.requires_grad_(True)
        elif mode == "top":
            self.requires_grad_(True)
            for name in self.bottom(top):
                for p in self.model.get_submodule(name).parameters(recurse=False):
                    p.requires_grad_(False)
        elif mode == "lora":
            if not self.has_lora:
                self._add_lora(lora_r, lora_alpha)
            for n, p in self.named_parameters():
                p.requires_grad_("lora_" in n)
        if mode != "frozen":
            self._fingerprint.clear()  # its weights are about to change

    @property
    def has_lora(self) -> bool:
        return any("lora_" in n for n, _ in self.named_parameters())

    def _add_lora(self, r: int, alpha: int) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        kinds = (nn.Linear, nn.Conv2d)
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, kinds) and n})
        if not targets:
            raise ValueError(
                f"{type(self.model).__name__} has no linear or convolution layers for LoRA to wrap: "
                "use vision_mode full or top"
            )
        try:
            inject_adapter_in_model(
                LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), self.model
            )
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"LoRA cannot wrap this vision tower ({type(self.model).__name__}): {e}; use vision_mode full or top"
            ) from e

    def merged_model(self) -> nn.Module:
        """The HF vision model with any LoRA adapters folded into its weights (W + B A x scale), as a
        copy; the model itself when it has none: what `save_pretrained` writes."""
        if not self.has_lora:
            return self.model
        import copy

        from peft.tuners.lora import LoraLayer

        model = copy.deepcopy(self.model)
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, module.get_base_layer())
        return model

    def moving_buffers(self) -> list[str]:
        """Names of the buffers training changes (BatchNorm statistics of a trained tower with
        `bn_train`): what a checkpoint keeps beside the trainable weights."""
        if not self.bn_train or not any(p.requires_grad for p in self.parameters()):
            return []
        return [
            n
            for n, b in self.named_buffers()
            if n.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        ]

    @property
    def layers(self) -> list[nn.Module]:
        """The encoder's transformer layers (empty for a model without an `encoder.layers` list)."""
        return list(getattr(getattr(vision_core(self.model), "encoder", None), "layers", []))

    def fingerprint(self, top: int = 0) -> str:
        """sha256 over the weights (names, dtypes, shapes, bytes): the encoder's identity in
        feature-cache keys, the same for a Hub id, a local copy or a model folder's `vision/`.
        With `top`, over the weights below the top `top` blocks only (what `below` depends on), so
        a store of that cut stays valid while the blocks above it train."""
        if top not in self._fingerprint:
            keep = None if not top else tuple(f"{n}." for n in self.bottom(top))
            h = hashlib.sha256()
            for name, t in sorted(self.model.state_dict().items()):
                if keep is not None and not name.startswith(keep):
                    continue
                t = t.detach().cpu().contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            self._fingerprint[top] = h.hexdigest()
        return self._fingerprint[top]

    def settings(self, top: int = 0) -> dict:
        """Everything about the encoder that changes its features (part of a feature-cache key);
        with `top`, of the states below the top `top` blocks (`below`): the cut is in the key."""
        out = {
            "encoder": self.fingerprint(top),
            "encoder_dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "feature_layer": self.feature_layer,
            "pooled": self.pooled,
        }
        if top:
            out["vision_top"] = top
        return out

    def release(self) -> None:
        """Free the weights when every feature comes from a cache; `forward` then refuses to run."""
        self.fingerprint()
        if self.from_states:
            raise RuntimeError("the vision tower runs its top blocks on stored states: it cannot be released")
        with torch.no_grad():  # the weights go; buffers (BatchNorm statistics: a few KB) stay readable
            for module in self.model.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    setattr(module, name, nn.Parameter(p.to("meta"), requires_grad=False))
        self.released = True

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        feature_layer: int = -1,
        dtype: torch.dtype = torch.float32,
        pooled: bool = False,
        image_size: int | None = None,
    ) -> VisionTower:
        """Load `path`; a conv tower's resolution is `image_size` or its image processor's."""
        model = load_vision_model(path, dtype)
        if image_size is None and not is_vit(model.config):
            from vlmforge.data.images import ImageProcessor

            image_size = ImageProcessor.from_encoder(path).size
        try:
            return cls(model, feature_layer, pooled, image_size)
        except (AttributeError, TypeError, KeyError, IndexError, RuntimeError) as e:  # outputs it cannot read
            why = f"{type(model).__name__} gives no features vlmforge reads ({e})"
            raise unusable(path, "a vision tower", why) from e

    def check_native(self) -> None:
        """Refuse native-resolution inputs to a ViT that cannot interpolate its position embeddings."""
        if not self.convolutional and not self.interpolates:
            raise ValueError(
                f"{type(self.model).__name__} cannot interpolate its position embeddings: "
                "resize native needs SigLIP, CLIP or a conv tower"
            )

    def image_processor(self, path: str, resize: str = "pad", grid: int = 0, **options):
        """The `ImageProcessor` of this tower: `path`'s mean and std at the tower's resolution, native
        sizes in multiples of its patch (refused for a ViT that cannot encode them); `options`: the
        slicing and native fields."""
        from vlmforge.data.images import ImageProcessor

        if resize == "native":
            self.check_native()
        return ImageProcessor.from_encoder(path, self.image_size, resize, grid, unit=self.patch_size, **options)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.released:
            raise RuntimeError("the vision encoder was released (features come from a cache); it cannot encode pixels")
        pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        h, w = pixel_values.shape[-2:]
        other = {}
        if not self.convolutional and (h, w) != (self.image_size, self.image_size):
            self.check_native()
            other["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=pixel_values, output_hidden_states=self.feature_layer != -1, **other)
        return self._features(out, (h // self.patch_size) * (w // self.patch_size))

    # ---- a cut through the tower: what lies below its top blocks, and the rest from there -----
    def check_cut(self, top: int) -> None:
        """Refuse a cut below the top `top` blocks that this tower cannot make, naming why."""
        depth = len(self.blocks)
        if not 1 <= top <= depth:
            raise ValueError(f"vision_top {top}: this vision tower has {depth} blocks (use 1 to {depth})")
        if self.feature_layer != -1:  # hidden_states: the embeddings' output, then one per block
            layer = self.feature_layer % (depth + 1)
            if layer <= depth - top:
                raise ValueError(
                    f"feature_layer {self.feature_layer} lies below the top {top} blocks: the features "
                    f"would not depend on them (use vision_top <= {depth - layer})"
                )

    def below(self, pixel_values: torch.Tensor, top: int) -> torch.Tensor:
        """The tower's states where its top `top` blocks begin (the input of the lowest of them),
        per view [N, tokens, D] (a conv map flattened row-major, [N, H*W, C]): what a feature store
        keeps for training the top blocks; `above` runs the rest from them."""
        self.check_cut(top)
        seen = []

        def stop(module, args):
            seen.append(args[0])
            raise _Cut

        handle = self.blocks[len(self.blocks) - top].register_forward_pre_hook(stop)
        try:
            self.forward(pixel_values)
        except _Cut:
            pass
        finally:
            handle.remove()
        states = seen[0]
        return states.flatten(2).transpose(1, 2) if states.dim() == 4 else states

    def for_store(self, pixel_values: torch.Tensor, top: int = 0) -> torch.Tensor:
        """What a feature store of cut `top` holds for these pixels: the states below the top `top`
        blocks (`below`), or with `top` 0 the tower's output."""
        return self.below(pixel_values, top) if top else self.forward(pixel_values)

    def above(self, states: torch.Tensor, top: int) -> torch.Tensor:
        """Patch features [N, P, Dv] from `below`'s states: only the top `top` blocks and what
        follows them (final norm; the pooling head where `pooled`) run; the embeddings and lower blocks are skipped."""
        self.check_cut(top)
        core, blocks = vision_core(self.model), self.blocks
        first = blocks[len(blocks) - top]
        states = states.to(next(first.parameters()).dtype)
        n, tokens = states.shape[:2]
        if self.convolutional:
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise ValueError(
                    f"stored states of {tokens} positions are not a square map: the top blocks of a "
                    "conv tower run from a store of square views only (not resize native)"
                )
            states = states.transpose(1, 2).reshape(n, -1, side, side)
        skipped = [getattr(core, n) for n in ("embeddings", "embedder") if hasattr(core, n)]
        skipped += blocks[: len(blocks) - top]
        skip = lambda *args, **kwargs: states  # noqa: E731 (what a skipped module returns is never used)
        for module in skipped:
            module.forward = skip
        handle = first.register_forward_pre_hook(lambda module, args: (states, *args[1:]))
        try:
            pixels = states.new_zeros(1, 1, 1, 1).expand(n, 3, self.image_size, self.image_size)  # never read
            out = self.model(pixel_values=pixels, output_hidden_states=self.feature_layer != -1)
        finally:
            handle.remove()
            for module in skipped:
                del module.forward
        return self._features(out, tokens - int(self.has_cls) if not self.convolutional else 0)

    @property
    def has_cls(self) -> bool:
        """A ViT whose embeddings prepend a class token (CLIP, DINO); SigLIP's do not."""
        embeddings = getattr(vision_core(self.model), "embeddings", None)
        return any(hasattr(embeddings, n) for n in ("class_embedding", "cls_token"))

    def _features(self, out, patches: int) -> torch.Tensor:
        """Patch features [N, P (+1), Dv] of a model output whose images have `patches` patches."""
        feats = self._select(out)
        if feats.dim() == 4:  # a feature map [N, C, H, W] -> H x W tokens, row-major
            feats = feats.flatten(2).transpose(1, 2)
        elif feats.shape[1] == patches + 1:  # drop CLS
            feats = feats[:, 1:]
        if self.pooled:
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                raise ValueError("this vision encoder has no pooled output; set pooled to false")
            if pooled.flatten(1).shape[-1] != feats.shape[-1]:
                raise ValueError(
                    f"the pooled output ({pooled.flatten(1).shape[-1]} wide) and stage {self.feature_layer}'s "
                    f"features ({feats.shape[-1]} wide) differ in width; set pooled to false"
                )
            feats = torch.cat([pooled.flatten(1)[:, None].to(feats.dtype), feats], dim=1)
        return feats  # [N, P (+1), Dv]
