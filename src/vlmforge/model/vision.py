"""The vision tower: any HF vision encoder, loaded like a Hub checkpoint, returning patch features.

Dual-encoder checkpoints (SigLIP, CLIP) are loaded through their vision-only classes so the text
tower is never materialised. `feature_layer=-1` takes the last hidden state (after the encoder's
final norm, as Idefics2 does); other values index `hidden_states` (LLaVA uses -2). A CLS token, if
the encoder has one, is dropped so that only patch features remain.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

# Vision-only classes of dual-encoder checkpoints, by the checkpoint's model_type.
_VISION_CLASSES = {
    "siglip": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
    "clip": "CLIPVisionModel",
}


def _quiet_hf():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def vision_core(model: nn.Module) -> nn.Module:
    """The vision transformer of an HF vision model (some classes wrap it as `vision_model`)."""
    return getattr(model, "vision_model", model)


def check_loading_info(path: str, info: dict) -> None:
    """Refuse a checkpoint that leaves weights uninitialised (wrong architecture or a broken file)."""
    missing = [k for k in info.get("missing_keys", []) if "rotary" not in k]
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise ValueError(f"{path}: {len(missing)} weights missing from the checkpoint (e.g. {shown})")


def load_vision_model(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the vision part of `path` (Hub id or folder) with `from_pretrained`."""
    import transformers
    from transformers import AutoConfig, AutoModel

    _quiet_hf()
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a vision encoder from {path!r}: {e}") from e
    cls_name = _VISION_CLASSES.get(config.model_type)
    cls = getattr(transformers, cls_name) if cls_name else AutoModel
    model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True)
    check_loading_info(path, info)
    return vision_core(model) if cls_name is None else model


class VisionTower(nn.Module):
    """Wraps an HF vision model; `forward` maps pixels [N, 3, H, W] to patch features [N, P, Dv]."""

    def __init__(self, model: nn.Module, feature_layer: int = -1, pooled: bool = False):
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        self.pooled = pooled
        cfg = getattr(model.config, "vision_config", model.config)
        self.hidden_size = cfg.hidden_size
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        # the encoder's pooled embedding (SigLIP's attention-pool head) as one extra leading feature
        self.num_features = self.num_patches + int(pooled)
        self.released = False
        self._fingerprint: str | None = None

    @property
    def layers(self) -> list[nn.Module]:
        """The encoder's transformer layers (empty for a model without an `encoder.layers` list)."""
        return list(getattr(getattr(vision_core(self.model), "encoder", None), "layers", []))

    def fingerprint(self) -> str:
        """sha256 over the weights (names, dtypes, shapes, bytes): the encoder's identity in
        feature-cache keys, the same for a Hub id, a local copy or a model folder's `vision/`."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in sorted(self.model.state_dict().items()):
                t = t.detach().cpu().contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def settings(self) -> dict:
        """Everything about the encoder that changes its features (part of a feature-cache key)."""
        return {
            "encoder": self.fingerprint(),
            "encoder_dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "feature_layer": self.feature_layer,
            "pooled": self.pooled,
        }

    def release(self) -> None:
        """Free the weights when every feature comes from a cache; `forward` then refuses to run."""
        self.fingerprint()
        self.model.to("meta")
        self.released = True

    @classmethod
    def from_pretrained(
        cls, path: str, feature_layer: int = -1, dtype: torch.dtype = torch.float32, pooled: bool = False
    ) -> VisionTower:
        return cls(load_vision_model(path, dtype), feature_layer, pooled)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.released:
            raise RuntimeError("the vision encoder was released (features come from a cache); it cannot encode pixels")
        pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        out = self.model(pixel_values=pixel_values, output_hidden_states=self.feature_layer != -1)
        feats = out.last_hidden_state if self.feature_layer == -1 else out.hidden_states[self.feature_layer]
        if feats.shape[1] == self.num_patches + 1:  # drop CLS
            feats = feats[:, 1:]
        if self.pooled:
            if getattr(out, "pooler_output", None) is None:
                raise ValueError("this vision encoder has no pooled output; set pooled to false")
            feats = torch.cat([out.pooler_output[:, None].to(feats.dtype), feats], dim=1)
        return feats  # [N, P (+1), Dv]
