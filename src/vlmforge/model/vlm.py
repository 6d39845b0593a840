"""The VLM: vision tower → connector → visual tokens spliced into a causal LM's input embeddings.

The model takes *either* pixel values *or* precomputed image features (the output of the vision
tower); everything after the encoder is identical for both, which is the seam that feature
caching and serving use. Placeholder tokens (`<|image_pad|>`) mark where visual tokens go; their
count must equal images × visual tokens per image, else a ValueError names both numbers.

Saved as a vlmforge model folder, whose layout `model/folder.py` owns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmforge import runtime
from vlmforge.config import ModelConfig, from_dict
from vlmforge.data.images import ImageProcessor
from vlmforge.data.prompts import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE,
    IMAGE_END,
    IMAGE_START,
    ROW_BREAK,
    SPECIAL_TOKENS,
    PromptBuilder,
    separator_vocab,
    view_tokens,
)
from vlmforge.io import atomic_dir, unusable
from vlmforge.model import folder
from vlmforge.model.connectors import build_connector
from vlmforge.model.vision import VisionTower, by_shape, check_loading_info, load_vision_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class VLMOutput:
    loss: torch.Tensor | None = None  # mean over label tokens
    loss_sum: torch.Tensor | None = None  # sum over label tokens (for exact gradient accumulation)
    n_tokens: int = 0
    logits: torch.Tensor | None = None  # [B, L, V], only when no labels are given


def hf_location(path: str) -> tuple[str, dict]:
    """What transformers' `from_pretrained` takes for an LM or tokenizer: a Hub id or folder as it
    is, or a GGUF file (llama.cpp's format: its weights dequantised, its tokenizer and chat
    template read from the file, through transformers' own GGUF loader) as its folder + `gguf_file`."""
    local = Path(path)
    if local.suffix == ".gguf":
        if not local.is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        return str(local.parent), {"gguf_file": local.name}
    return path, {}


@runtime.quiet_libraries()
def load_tokenizer(path: str, split_grid: int = 0, max_slices: int = 0, native: bool = False):
    from transformers import AutoTokenizer

    local = Path(path)
    if local.is_dir() and not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise unusable(path, "a tokenizer", "the folder has no tokenizer.json or tokenizer_config.json")
    where, gguf = hf_location(path)
    try:
        tok = AutoTokenizer.from_pretrained(where, **gguf)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise unusable(path, "a tokenizer", e) from e
    extra = separator_vocab(split_grid, max_slices, native)
    missing = [t for t in SPECIAL_TOKENS + extra if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.chat_template is None:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@runtime.quiet_libraries()
def load_lm(path: str, dtype: torch.dtype = torch.float32, device_map: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    placed = {"device_map": device_map} if device_map else {}
    where, gguf = hf_location(path)
    if gguf:  # every weight unpacked into a plain dense model: trainable, saved as any other
        from transformers import GgufConfig

        gguf["quantization_config"] = GgufConfig(dequantize=True)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, output_loading_info=True, **placed, **gguf
        )
    except (OSError, ValueError, KeyError) as e:
        raise unusable(path, "a causal LM", e) from e
    check_loading_info(path, info)
    if getattr(model, "hf_quantizer", None) is not None and gguf:
        model.hf_quantizer.remove_quantization_config(model)  # nothing is left quantized
    return model


@dataclass
class ImageViews:
    """The views of an image of a given size in its prompt block, `(separator or None, visual
    tokens)` each in the order the encoder's outputs come (a plain object, so that datasets that
    hold it pickle without the model)."""

    processor: ImageProcessor
    tokens_per_view: int
    pooled: int  # 1 when the encoder's pooled token precedes the patches
    fixed: int | None  # the connector's tokens when they do not depend on the patches (perceiver)

    def __call__(self, size: tuple[int, int]) -> list[tuple[str | None, int]]:
        proc = self.processor
        if proc.resize == "native":  # the pooled token, then the patch grid's rows, row breaks between them
            w, h = proc.input_size(size)
            if self.fixed:
                return [(None, self.fixed)]
            cols, rows = w // proc.unit, h // proc.unit
            return [(None, self.pooled + cols)] + [(ROW_BREAK, cols)] * (rows - 1)
        seps = view_tokens(proc.grid_for(size))
        return [(sep, self.tokens_per_view) for sep in seps] if seps else [(None, self.tokens_per_view)]


class VLM(nn.Module):
    def __init__(self, config: ModelConfig, vision: VisionTower, lm: nn.Module, tokenizer, processor: ImageProcessor):
        super().__init__()
        self.config = config
        self.vision = vision
        self.lm = lm
        self.tokenizer = tokenizer
        self.processor = processor
        lm_dim = self.causal_lm.get_input_embeddings().weight.shape[1]
        self.connector = build_connector(config.connector, vision.hidden_size, lm_dim, **config.connector_settings())
        if config.architecture == "cross_attention":
            from vlmforge.model.cross_attention import CrossAttentionBridge

            layers = self.causal_lm.get_decoder().layers
            heads, every = config.connector_heads, config.xattn_every
            self.connector = CrossAttentionBridge(self.connector, layers, lm_dim, heads, every)
            if config.layout == "bare":
                raise ValueError(
                    "the cross-attention architecture needs the <image> markers: use layout llama3v or inline"
                )
        elif config.architecture != "autoregressive":
            raise ValueError(f"unknown architecture {config.architecture!r} (autoregressive or cross_attention)")
        if processor.variable and self.cross_attention:
            raise ValueError(
                "the cross-attention architecture takes a fixed number of views per image: "
                "not with adaptive slicing or resize native"
            )
        # with image splitting every view (crops + the whole image) gets its own visual tokens;
        # adaptive slicing: the most an image gets; native: an image of the encoder's own square
        self.tokens_per_view = self.connector.num_tokens(vision.num_features)
        self.tokens_per_image = self.tokens_per_view * processor.num_views
        # visual tokens placed in the LM's sequence: none with cross-attention (only the markers)
        self.sequence_tokens_per_image = 0 if self.cross_attention else self.tokens_per_image
        fixed = None if getattr(self.connector, "per_patch", True) else self.tokens_per_view
        self.image_views = ImageViews(processor, self.tokens_per_view, int(vision.pooled), fixed)
        if processor.resize == "native" and config.connector == "pixel_shuffle":
            raise ValueError("the pixel_shuffle connector needs a square patch grid: not with resize native")
        self.prompts = PromptBuilder(
            tokenizer,
            self.sequence_tokens_per_image,
            config.layout,
            config.split_grid,
            self.image_views if processor.variable else None,
        )
        self.image_start_id = tokenizer.convert_tokens_to_ids(IMAGE_START)
        self.image_token_id = self.prompts.image_token_id
        self.lm_mode = "frozen"
        self.history: list[dict] = []  # the training stages that made this model (the model card's)
        self.evals: list[dict] = []  # eval scores recorded in its folder (`folder.record_evals`)
        self.vision_source: str | None = None  # where the vision weights came from (to save a released tower)

    # ---- construction and persistence -------------------------------------------------------
    @classmethod
    def from_backbones(cls, config: ModelConfig) -> VLM:
        """Assemble a fresh VLM (new connector) from a vision encoder and an LM, Hub ids or folders."""
        if not config.vision or not config.lm:
            raise ValueError("a model needs both a vision encoder (--model.vision) and an LM (--model.lm)")
        dtype = DTYPES[config.dtype]
        vision = VisionTower.from_pretrained(
            config.vision, config.feature_layer, dtype, config.vision_pooled, config.image_size
        )
        adaptive = config.max_slices if config.slicing == "adaptive" else 0
        native = config.resize == "native"
        tok = load_tokenizer(config.tokenizer or config.lm, max(config.split_grid, 0), adaptive, native)
        lm = load_lm(config.lm, dtype, config.device_map)
        if len(tok) > lm.get_input_embeddings().weight.shape[0]:
            lm.resize_token_embeddings(len(tok))
        if config.split_grid < 0:
            raise ValueError(f"split_grid must be 0 (off) or a grid size k >= 1, got {config.split_grid}")
        proc = vision.image_processor(config.vision, config.resize, config.split_grid, **config.image_settings())
        model = cls(config, vision, lm, tok, proc)
        model.vision_source = config.vision
        if config.device_map:  # the LM is placed; the rest goes where its input embeddings are
            device = lm.get_input_embeddings().weight.device
            model.vision.to(device)
            model.connector.to(device)
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, device_map: str | None = None) -> VLM:
        """Load a folder written by `save_pretrained`; `device_map` places the LM as in
        transformers' `from_pretrained` (default: the saved config's, usually none: the CPU)."""
        meta = folder.read_meta(path)
        cfg = from_dict(ModelConfig, meta["model"])
        lm = str(folder.lm_dir(path))
        cfg = dataclasses.replace(cfg, vision=str(folder.vision_dir(path)), lm=lm, tokenizer=lm)
        if device_map is not None:
            cfg = dataclasses.replace(cfg, device_map=device_map)
        model = cls.from_backbones(cfg)
        device = next(model.connector.parameters()).device
        model.connector.load_state_dict(folder.read_connector(path, str(device)))
        if folder.has_adapter(path):
            from peft import PeftModel

            model.lm = PeftModel.from_pretrained(model.lm, str(folder.adapter_dir(path)))
            model.lm_mode = "lora"
        else:
            model.lm_mode = meta.get("lm_mode", "frozen")
        model.history = meta.get("history") or ([meta["trained"]] if "trained" in meta else [])
        model.evals = meta.get("evals") or []
        return model.eval()

    def merge_lora(self) -> int:
        """Fold the LoRA adapters into the LM's weights (W + B A x scale), leaving a plain LM;
        returns how many layers were merged. The model computes the same function."""
        if not hasattr(self.lm, "merge_and_unload"):
            raise ValueError("this model has no LoRA adapters to merge (its LM was trained frozen or in full)")
        merged = sum(1 for n, _ in self.lm.named_modules() if n.endswith("lora_A"))
        self.lm = self.lm.merge_and_unload()
        self.lm_mode = "full"
        return merged

    def save_pretrained(self, path: str | Path, extra: dict | None = None, state_dict: dict | None = None) -> None:
        """Write the whole model to `path` atomically (a temp folder renamed into place).
        `state_dict`: the model's full weights by name when its own are sharded (FSDP)."""
        from transformers import AutoImageProcessor

        def part(prefix: str, module: nn.Module | None = None) -> dict | None:
            """The weights of the submodule at `prefix`: from `state_dict` when given, else the
            module's own (or None, which lets `save_pretrained` take them itself)."""
            if state_dict is None:
                return module.state_dict() if module is not None else None
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

        src = self.vision_source
        peft = hasattr(self.lm, "peft_config")
        with atomic_dir(path) as tmp:
            vision, lm = folder.vision_dir(tmp), folder.lm_dir(tmp)
            if self.vision.released:  # frozen, so the weights are the source's: load them to save
                if not src:
                    raise RuntimeError("the vision encoder was released and its source is unknown")
                load_vision_model(src, next(self.vision.model.parameters()).dtype).save_pretrained(vision)
            else:
                tower = self.vision.merged_model()  # LoRA adapters on the tower are folded in
                if tower is self.vision.model:
                    tower.save_pretrained(vision, state_dict=part("vision.model."))
                else:
                    tower.save_pretrained(vision)
            if src:
                AutoImageProcessor.from_pretrained(src).save_pretrained(vision)
            if self.lm_mode == "lora":
                # the base weights under their own names (LoRA layers wrap them as `base_layer`)
                causal = part("lm.base_model.model." if peft else "lm.", self.causal_lm)
                base = {k.replace(".base_layer.", "."): v for k, v in causal.items() if "lora_" not in k}
                self.causal_lm.save_pretrained(lm, state_dict=base)
                self.lm.save_pretrained(folder.adapter_dir(tmp), state_dict=part("lm."))
            else:
                self.lm.save_pretrained(lm, state_dict=part("lm."))
            self.tokenizer.save_pretrained(lm)
            folder.write_connector(tmp, part("connector.", self.connector))
            folder.write_meta(
                tmp, dataclasses.asdict(self.config), self.lm_mode, self.tokens_per_image, self.history, extra
            )

    # ---- the forward pass -------------------------------------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        """The HF causal LM (the base model under a peft wrapper; LoRA layers are in place)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [N, 3, H, W] → patch features [N, P, Dv] (no graph when the tower is frozen).
        With image splitting, N counts views (crops and whole images), in prompt order."""
        trainable = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return self.vision(pixel_values)

    def stored_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What a feature store holds for these pixels: patch features, or, while the tower's top
        blocks train from a store of their cut (`vision.from_states`), the states below them."""
        with torch.no_grad():
            return self.vision.for_store(pixel_values, self.vision.from_states)

    def image_tokens(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        """Visual tokens [tokens, D] of each image of `items`, each its pixels [V, 3, H, W] or its
        features [V, P, Dv]; items of one shape are encoded and connected together."""

        def embed(x: torch.Tensor) -> torch.Tensor:
            return self.image_embeds(pixel_values=x) if x.dim() == 4 else self.image_embeds(image_features=x)

        return [t.reshape(-1, t.shape[-1]) for t in by_shape(items, embed)]

    def image_embeds(self, pixel_values=None, image_features=None) -> torch.Tensor:
        if image_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or image_features")
            image_features = self.encode_images(pixel_values)
        elif self.vision.from_states:  # states below the top blocks: those blocks run now
            image_features = self.vision.above(image_features, self.vision.from_states)
        if image_features.dim() != 3 or image_features.shape[-1] != self.vision.hidden_size:
            raise ValueError(
                f"image_features must be [images, patches, {self.vision.hidden_size}], got {list(image_features.shape)}"
            )
        dtype = next(self.connector.parameters()).dtype
        return self.connector(image_features.to(dtype))  # [N, T, D]

    def image_starts(self, ids: list[int]) -> list[int]:
        """Where each image's block begins in a prompt: its `<image>` marker, or with the bare
        layout its first placeholder (every `sequence_tokens_per_image` placeholders make one)."""
        if self.config.layout != "bare":
            return [i for i, t in enumerate(ids) if t == self.image_start_id]
        per, seen, out = max(self.sequence_tokens_per_image, 1), 0, []
        for i, t in enumerate(ids):
            if t == self.image_token_id:
                if seen % per == 0:
                    out.append(i)
                seen += 1
        return out

    def image_ends(self, ids: list[int]) -> list[int]:
        """Where each image's last placeholder is in a prompt (an image of no placeholders,
        cross-attention's: its `<image>` marker)."""
        if self.config.layout == "bare":
            per = max(self.sequence_tokens_per_image, 1)
            places = [i for i, t in enumerate(ids) if t == self.image_token_id]
            return places[per - 1 :: per]
        ends, last, end_id = [], None, self.image_token_ids[2]
        for i, t in enumerate(ids):
            if t == self.image_start_id or t == self.image_token_id:
                last = i
            elif t == end_id and last is not None:
                ends.append(last)
                last = None
        return ends

    def image_token_count(self, size: tuple[int, int]) -> int:
        """Visual tokens of an image of `size` (width, height) in the LM's sequence."""
        if self.cross_attention:
            return 0
        return sum(n for _, n in self.image_views(size))

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        """The ids of an image block's marker and placeholder tokens."""
        return self.image_start_id, self.image_token_id, self.tokenizer.convert_tokens_to_ids(IMAGE_END)

    @property
    def cross_attention(self) -> bool:
        return self.config.architecture == "cross_attention"

    def embed(self, input_ids, pixel_values=None, image_features=None) -> torch.Tensor:
        """Token embeddings with visual tokens written at the placeholder positions. [B, L, D]
        With the cross-attention architecture the embeddings are the text's own, and the visual
        tokens become the context of the gated cross-attention layers (until `clear_context`)."""
        embeds = self.causal_lm.get_input_embeddings()(input_ids)
        if self.cross_attention:
            self.connector.clear_context()
            if pixel_values is not None or image_features is not None:
                if isinstance(pixel_values, list):  # per image (the views of one size here)
                    pixel_values = torch.cat(pixel_values)
                if isinstance(image_features, list):
                    image_features = torch.cat(image_features)
                vis = self.image_embeds(pixel_values, image_features)  # [N_views, T, D]
                images = (input_ids == self.image_start_id).sum(dim=1)  # [B]
                self.connector.set_context(vis, images, self.processor.num_views)
            return embeds
        mask = input_ids == self.image_token_id  # [B, L]
        n_placeholders = int(mask.sum())
        if pixel_values is None and image_features is None:
            if n_placeholders:
                raise ValueError(f"{n_placeholders} image placeholder tokens in the input but no images given")
            return embeds
        ragged = image_features if isinstance(image_features, list) else pixel_values
        if isinstance(ragged, list):  # per image, of varying views or shapes
            vis = torch.cat(self.image_tokens(ragged))
            what = f"{len(ragged)} images' {vis.shape[0]} tokens"
        else:
            vis = self.image_embeds(pixel_values, image_features)  # [N, T, D]
            what = f"{vis.shape[0]} images x {vis.shape[1]} tokens = {vis.shape[0] * vis.shape[1]}"
        if n_placeholders != vis.shape[0] * (1 if vis.dim() == 2 else vis.shape[1]):
            raise ValueError(f"image placeholder tokens ({n_placeholders}) do not match visual features ({what})")
        return embeds.masked_scatter(mask.unsqueeze(-1), vis.to(embeds.device, embeds.dtype))

    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        pixel_values=None,
        image_features=None,
        all_params=False,
        position_ids=None,
    ) -> VLMOutput:
        """`attention_mask`: [B, L] (1 = a token, 0 = padding), or [B, 1, L, L] bool (True = may
        attend) with `position_ids` [B, L] for sequences of several records (`data.collate`).
        `all_params`: without images, still run the connector (and a trained vision tower) on
        zeros, times 0, so that every trainable parameter gets a gradient; FSDP needs every rank
        to reduce the same ones."""
        embeds = self.embed(input_ids, pixel_values, image_features)
        if all_params and pixel_values is None and image_features is None and not self.cross_attention:
            if any(p.requires_grad for p in self.vision.parameters()):  # the tower trains: run it too
                size = self.vision.image_size
                zeros = {"pixel_values": embeds.new_zeros(1, 3, size, size)}
            else:
                zeros = {"image_features": embeds.new_zeros(1, self.vision.num_features, self.vision.hidden_size)}
            embeds = embeds + 0.0 * self.image_embeds(**zeros).sum().to(embeds.dtype)
        lm = self.causal_lm
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = self._block_mask(attention_mask.to(embeds.device), embeds.dtype)
        try:
            out = lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
            hidden = out.last_hidden_state  # [B, L, D]
        finally:
            if self.cross_attention:
                self.connector.clear_context()
        head = lm.get_output_embeddings()
        if labels is None:
            return VLMOutput(logits=head(hidden))
        target = labels[:, 1:].to(hidden.device)  # the last layers may sit on another device (device_map)
        keep = target != IGNORE
        # The LM head runs only where there is a label: most positions (image tokens, prompts) have none.
        logits = head(hidden[:, :-1][keep]).float()  # [T, V]
        loss_sum = F.cross_entropy(logits, target[keep], reduction="sum")
        n = int(keep.sum())
        return VLMOutput(loss=loss_sum / max(n, 1), loss_sum=loss_sum, n_tokens=n)

    def _block_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A bool block mask as the LM's attention takes it: bool for SDPA, additive for eager."""
        impl = self.causal_lm.config._attn_implementation
        if impl == "sdpa":
            return mask
        if impl == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        raise ValueError(f"sequences of several records need the LM's attention to be sdpa or eager, not {impl!r}")

    # ---- inference --------------------------------------------------------------------------
    def build_prompt(
        self, question: str, n_images: int = 1, history: list[dict] | None = None, images: list | None = None
    ) -> list[int]:
        """A user turn of `question` after `n_images` image markers (`images`, PIL images or
        sizes, when given: their number, and their blocks where those depend on the size; the
        `history` then holds no images)."""
        n_images = len(images) if images is not None else n_images
        text = "<image>" * n_images + "\n" + question if n_images else question
        messages = list(history or []) + [{"role": "user", "content": text}]
        sizes = [im if isinstance(im, tuple) else im.size for im in images] if images is not None else None
        return self.prompts.encode_prompt(messages, sizes)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        ignore_eos: bool = False,
    ) -> list[list[int]]:
        """Greedy decoding of a batch of token-id prompts (left-padded) with transformers'
        `generate`; returns the new ids, stopping at the end-of-turn tokens (with `ignore_eos`,
        exactly `max_new_tokens` of them). The reference `infer.engine.Engine` is tested and
        benchmarked against."""
        import copy

        device = next(self.parameters()).device
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        gc = copy.deepcopy(self.causal_lm.generation_config)
        gc.max_new_tokens, gc.min_new_tokens, gc.do_sample, gc.pad_token_id = max_new_tokens, None, False, pad
        # with ignore_eos an empty list, not None: None would take the LM's own generation_config default
        gc.eos_token_id = [] if ignore_eos else self.prompts.stop_ids
        with torch.inference_mode():
            embeds = self.embed(ids, pixel_values, image_features)
            try:
                out = self.causal_lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gc)
            finally:
                if self.cross_attention:
                    self.connector.clear_context()
        if ignore_eos:
            return out.tolist()
        results = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in self.prompts.stop_ids), len(row))
            results.append(row[:cut])
        return results
