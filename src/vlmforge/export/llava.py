"""Models in and out: export to transformers' LLaVA format (what vLLM and TGI serve) or to
vlmforge's own, with a model card; import LLaVA checkpoints.

`llava-hf` is `LlavaForConditionalGeneration` + `LlavaProcessor`: vision tower → feature layer →
two-layer projector → visual tokens at the image-token positions of a causal LM. A vlmforge
model maps onto it exactly when it is autoregressive, has the `mlp` connector (hidden width = LM
width) or the `linear` one (written as an MLP whose second layer is the identity), no image
splitting and no pooled feature. The rest carries over as configuration:

* the feature layer: vlmforge's -1 is the encoder's output *after* its final norm (Idefics2's
  choice), which transformers' `hidden_states[-1]` is not for SigLIP; the exported vision config
  sets `tie_last_hidden_states`, which makes `hidden_states[-1]` that output;
* the prompt layout: the processor's chat template turns `{"type": "image"}` items into
  vlmforge's image block (`<image>` + placeholder + `</image>`, before the text wrapped in
  `<text>`…`</text>` for the Llama3-V layout) and then renders the LM's own chat template; the
  processor expands the placeholder to the visual-token count;
* image processing: `squash`, `expand` (LLaVA-1.5's pad-to-square) and `crop` (CLIP's) are
  what `LlavaImageProcessor` does; `pad` (resize the long side, then pad) has no exact
  counterpart, so it is written as `expand` (pad first, then resize) and the command says the
  pixels, hence the logits, differ slightly.

`idefics2-hf` is refused with the reason (`IDEFICS2_REASON`): the perceiver's weights map onto
Idefics2's connector, but its processor, vision transformer and prompt tokens would not compute
the same model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlmforge import runtime
from vlmforge.config import ModelConfig, from_dict
from vlmforge.data.prompts import IMAGE_END, IMAGE_PAD, IMAGE_START, TEXT_END, TEXT_START
from vlmforge.export.errors import ExportError
from vlmforge.io import atomic_dir
from vlmforge.model import folder
from vlmforge.model.connectors import build_connector
from vlmforge.model.vision import vision_core

IDEFICS2_REASON = (
    "idefics2-hf is not written: the perceiver's weights would map onto Idefics2's connector, but "
    "transformers' Idefics2 would not compute the same model: its processor resizes images keeping "
    "their aspect ratio without padding them to a square (vlmforge's pixels match only for square "
    "images), its vision transformer places patches by fractional position buckets, and its prompt "
    "uses <image> as the placeholder inside <fake_token_around_image>, where vlmforge's <image> is "
    "the opening marker; export the perceiver model in vlmforge's format (--format vlmforge)"
)


def llava_obstacles(vlm) -> list[str]:
    """Why `vlm` cannot be written as `LlavaForConditionalGeneration` (empty when it can)."""
    from transformers import AutoModel

    c = vlm.config
    out = []
    if c.architecture != "autoregressive":
        out.append(f"architecture {c.architecture!r} (LLaVA places visual tokens in the sequence)")
    if c.connector not in ("mlp", "linear"):
        out.append(f"connector {c.connector!r} has no transformers class (LLaVA's projector is a 2-layer MLP)")
    lm_dim = vlm.causal_lm.get_input_embeddings().weight.shape[1]
    if c.connector == "mlp" and (c.connector_hidden or lm_dim) != lm_dim:
        out.append(f"mlp connector hidden width {c.connector_hidden} != LM width {lm_dim}")
    if c.split_grid:
        out.append(f"image splitting (split_grid {c.split_grid})")
    if c.slicing == "adaptive":
        out.append(
            "adaptive slicing: LLaVA-NeXT's anyres (the nearest transformers scheme) picks its grid "
            "from fixed pinpoint resolutions and marks rows with an image_newline embedding, not "
            "LLaVA-UHD's rule and row/column separator tokens"
        )
    if c.resize == "native":
        out.append("resize native: LLaVA encodes one fixed square input per image")
    if c.vision_pooled:
        out.append("the pooled vision feature (vision_pooled)")
    if vlm.vision.convolutional:
        out.append(
            f"convolutional vision tower {type(vlm.vision.model).__name__} (LLaVA's vision tower returns "
            "patch tokens; a feature map [C, H, W] has no place there)"
        )
        return out
    vcfg = vlm.vision.model.config
    try:
        with torch.device("meta"):
            tower = type(AutoModel.from_config(vcfg))
    except (ValueError, KeyError) as e:
        tower = f"none ({e})"
    if tower is not type(vlm.vision.model):
        out.append(
            f"vision model {type(vlm.vision.model).__name__} is not what AutoModel builds from its config ({tower})"
        )
    decoder = vlm.causal_lm.get_decoder()
    with torch.device("meta"):
        built = type(AutoModel.from_config(vlm.causal_lm.config))
    if built is not type(decoder):
        out.append(f"LM decoder {type(decoder).__name__} is not what AutoModel builds from its config")
    n_layers = len(vlm.vision.layers)
    if c.feature_layer != -1 and not -n_layers - 1 <= c.feature_layer <= n_layers:
        out.append(f"feature_layer {c.feature_layer} is out of range")
    return out


def processor_chat_template(lm_template: str, layout: str) -> str:
    """A chat template for the exported processor: messages whose content is a list of
    `{"type": "image"}` / `{"type": "text"}` items (or a string with `<image>` markers) become
    vlmforge's prompt text, then the LM's own template renders them. One placeholder per image;
    the processor expands it to the visual-token count."""
    block = IMAGE_PAD if layout == "bare" else IMAGE_START + IMAGE_PAD + IMAGE_END
    if layout == "llama3v":
        compose = f"block * n + '{TEXT_START}' + (text | trim) + '{TEXT_END}'"
        from_string = f"block * n + '{TEXT_START}' + (c.replace('<image>', '') | trim) + '{TEXT_END}'"
    else:
        compose = "block * n + '\\n' + text"
        from_string = "c.replace('<image>', block)"
    head = (
        "{%- set block = '" + block + "' -%}"
        "{%- set ns = namespace(messages=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}"
        "{%- set c = m['content'] -%}{%- set n = c.count('<image>') -%}"
        "{%- set c = (" + from_string + ") if n else c -%}"
        "{%- else -%}"
        "{%- set n = m['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
        "{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}"
        "{%- set c = (" + compose + ") if n else text -%}"
        "{%- endif -%}"
        "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': c}] -%}"
        "{%- endfor -%}"
        "{%- set messages = ns.messages -%}"
    )
    return head + lm_template


def llava_image_processor(proc):
    """`LlavaImageProcessor` settings giving vlmforge's pixels (exactly for squash, expand and crop)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    s = proc.size
    common = {
        "image_mean": list(proc.mean),
        "image_std": list(proc.std),
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
    }
    if proc.resize == "crop":
        return LlavaImageProcessorPil(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s}, do_center_crop=True, do_pad=False, **common
        )
    return LlavaImageProcessorPil(
        size={"height": s, "width": s},
        crop_size={"height": s, "width": s},
        do_center_crop=False,
        do_pad=proc.resize in ("pad", "expand"),
        **common,
    )


@runtime.quiet_libraries()
def to_llava(vlm):
    """(LlavaForConditionalGeneration, LlavaProcessor, notes) computing what `vlm` computes.
    The weights are assigned, not copied: the returned model shares the tensors of `vlm`."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    problems = llava_obstacles(vlm)
    if problems:
        raise ExportError("cannot export to llava-hf: " + "; ".join(problems))
    if vlm.lm_mode == "lora":
        vlm.merge_lora()
    notes = []
    c, lm = vlm.config, vlm.causal_lm
    vcfg = vlm.vision.model.config.__class__.from_dict(vlm.vision.model.config.to_dict())
    has_cls = vlm.vision.num_patches + 1 == _num_tokens_out(vlm)
    if c.feature_layer == -1:
        vcfg.tie_last_hidden_states = True  # hidden_states[-1] is then the output after the final norm
        if getattr(vision_core(vlm.vision.model), "post_layernorm", None) is not None:
            notes.append(
                "feature layer -1 is the encoder's output after its final norm: transformers computes it "
                "(tie_last_hidden_states), but vLLM's LLaVA builds the vision tower without that norm "
                "(require_post_norm=False), so under vLLM the outputs would differ; for vLLM, train with "
                "--model.feature_layer -2 (LLaVA's choice) or another index"
            )
    conn = vlm.connector
    lm_dim = lm.get_input_embeddings().weight.shape[1]
    if c.connector == "mlp":
        proj = dict(zip(("linear_1", "linear_2"), conn.linears()))
        act = "gelu"
    else:  # linear: the second layer is the identity, the activation linear
        (first,) = conn.linears()
        eye = torch.nn.Linear(lm_dim, lm_dim, dtype=first.weight.dtype)
        with torch.no_grad():
            eye.weight.copy_(torch.eye(lm_dim))
            eye.bias.zero_()
        proj = {"linear_1": first, "linear_2": eye}
        act = "linear"
    dtype = next(lm.parameters()).dtype
    config = LlavaConfig(
        vision_config=vcfg,
        text_config=lm.config,
        image_token_index=vlm.image_token_id,
        image_seq_length=vlm.tokens_per_image,
        projector_hidden_act=act,
        vision_feature_select_strategy="default" if has_cls else "full",
        vision_feature_layer=c.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    config.dtype = dtype
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    hf.model.vision_tower.load_state_dict(vlm.vision.model.state_dict(), assign=True)
    hf.model.language_model.load_state_dict(lm.get_decoder().state_dict(), assign=True)
    hf.lm_head.load_state_dict(lm.get_output_embeddings().state_dict(), assign=True)
    for name, layer in proj.items():
        getattr(hf.model.multi_modal_projector, name).load_state_dict(layer.state_dict(), assign=True)
    if config.tie_word_embeddings:
        hf.tie_weights()
    _restore_buffers(hf, vlm)
    hf.generation_config = GenerationConfig(
        eos_token_id=vlm.prompts.stop_ids,
        pad_token_id=vlm.tokenizer.pad_token_id,
        bos_token_id=vlm.tokenizer.bos_token_id,
    )
    tok = vlm.tokenizer
    processor = LlavaProcessor(
        image_processor=llava_image_processor(vlm.processor),
        tokenizer=tok,
        patch_size=vlm.vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=processor_chat_template(tok.chat_template, c.layout),
        image_token=IMAGE_PAD,
        num_additional_image_tokens=int(has_cls),
    )
    notes.append(
        "pixels match vlmforge's with transformers' PIL image backend (what it uses without torchvision, "
        "and what the export was tested with); its torchvision backend resizes with torch's bicubic "
        "interpolation, which differs slightly"
    )
    if vlm.processor.resize == "pad":
        notes.append(
            "images: vlmforge's `pad` (resize the long side, then pad) is written as LLaVA's pad-to-square "
            "then resize; pixels near the padding edge differ slightly, so outputs on non-square images do too "
            "(train with --model.resize expand for an exact match)"
        )
    return hf, processor, notes


def _num_tokens_out(vlm) -> int:
    """Tokens the vision tower's hidden states have per image (patches, + 1 with a CLS token)."""
    emb = getattr(vision_core(vlm.vision.model), "embeddings", None)
    n = getattr(emb, "num_positions", None)
    return int(n) if n is not None else vlm.vision.num_patches


def _restore_buffers(hf, vlm) -> None:
    """Non-persistent buffers (position ids, rotary frequencies) stay on the meta device after an
    assigning load: take them from the source modules, which have the same structure."""
    sources = {
        "model.vision_tower": vlm.vision.model,
        "model.language_model": vlm.causal_lm.get_decoder(),
    }
    for prefix, src in sources.items():
        mine = dict(src.named_buffers())
        for name, buf in hf.get_submodule(prefix).named_buffers():
            if buf.is_meta:
                owner, _, attr = name.rpartition(".")
                hf.get_submodule(f"{prefix}.{owner}" if owner else prefix).register_buffer(
                    attr, mine[name].clone(), persistent=False
                )


@dataclasses.dataclass
class LlavaSource:
    """A LLaVA checkpoint checked for import: the loaded model, its image processor and tokenizer
    source, and the vlmforge model config it becomes."""

    src: str
    hf: object  # LlavaForConditionalGeneration
    image_processor: object
    model: ModelConfig
    history: list
    notes: list[str]


def read_llava(src: str, dtype: str | None = None) -> LlavaSource:
    """Load a `LlavaForConditionalGeneration` checkpoint and check that vlmforge computes the same
    model; each reason it cannot raises a `ValueError` naming `src`."""
    from transformers import AutoConfig, AutoImageProcessor, LlavaForConditionalGeneration

    if (Path(src).is_absolute() or src.startswith(".")) and not Path(src).is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    try:
        config = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read a model config from {src!r}: {e}") from e
    if config.model_type != "llava":
        raise ValueError(f"{src}: a {config.model_type!r} checkpoint, not llava (LlavaForConditionalGeneration)")
    feature_layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(feature_layer, int):
        raise ValueError(f"{src}: several vision feature layers {feature_layer} (vlmforge reads one)")
    if config.projector_hidden_act not in ("gelu", "linear"):
        raise ValueError(
            f"{src}: projector activation {config.projector_hidden_act!r} (vlmforge's mlp uses exact gelu)"
        )
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {"dtype": "auto"}
    hf = LlavaForConditionalGeneration.from_pretrained(src, **kwargs)
    vcfg = config.vision_config
    core = vision_core(hf.model.vision_tower)
    tied = bool(getattr(vcfg, "tie_last_hidden_states", False))
    if feature_layer == -1 and not tied and getattr(core, "post_layernorm", None) is not None:
        # transformers' hidden_states[-1] is before the final norm; vlmforge's -1 is after
        feature_layer = vcfg.num_hidden_layers
    cls_token = getattr(core.embeddings, "class_embedding", None) is not None
    if cls_token != (strategy == "default"):
        has = "with" if cls_token else "without"
        raise ValueError(
            f"{src}: vision_feature_select_strategy {strategy!r} with an encoder {has} a CLS token "
            "(vlmforge drops exactly the CLS token)"
        )
    projector = hf.model.multi_modal_projector
    connector = "mlp" if config.projector_hidden_act == "gelu" else "linear"
    if connector == "linear":
        w2 = projector.linear_2.weight
        if not torch.equal(w2, torch.eye(w2.shape[0], dtype=w2.dtype)):
            raise ValueError(f"{src}: a linear-activation projector whose second layer is not the identity")
    if projector.linear_1.bias is None or projector.linear_2.bias is None:
        raise ValueError(f"{src}: a projector without biases (multimodal_projector_bias false)")

    notes = []
    own = getattr(config, "vlmforge", None)  # written by `vlmforge export`
    ip = AutoImageProcessor.from_pretrained(src)
    if own:
        mc = from_dict(ModelConfig, own["model"])
    else:
        crop = getattr(ip, "do_center_crop", False)
        size = ip.crop_size["height"] if crop else (ip.size.get("height") or ip.size.get("shortest_edge"))
        resize = "crop" if crop else ("expand" if getattr(ip, "do_pad", False) else "squash")
        mc = ModelConfig(connector="mlp", layout="bare", resize=resize, image_size=int(size))
        notes.append(
            f"prompts: layout `bare` (the image placeholders alone, in place of <image>); image processing `{resize}`"
        )
    mc = dataclasses.replace(
        mc,
        connector=connector,
        connector_hidden=config.text_config.hidden_size,
        feature_layer=feature_layer,
        split_grid=0,
        vision_pooled=False,
        architecture="autoregressive",
    )
    return LlavaSource(src, hf, ip, mc, (own or {}).get("history", []), notes)


def write_llava_as_vlmforge(source: LlavaSource, out: str) -> None:
    """The checked checkpoint as a vlmforge model folder, written atomically; the weights are
    assigned, not copied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, mc = source.hf, source.model
    text_config = hf.config.text_config
    with atomic_dir(out) as tmp:
        hf.model.vision_tower.save_pretrained(folder.vision_dir(tmp))
        source.image_processor.save_pretrained(folder.vision_dir(tmp))
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(text_config)
        setattr(lm, lm.base_model_prefix, hf.model.language_model)
        lm.set_output_embeddings(hf.lm_head)
        lm.save_pretrained(folder.lm_dir(tmp))
        AutoTokenizer.from_pretrained(source.src).save_pretrained(folder.lm_dir(tmp))
        projector = hf.model.multi_modal_projector
        theirs = [projector.linear_1] if mc.connector == "linear" else [projector.linear_1, projector.linear_2]
        with torch.device("meta"):
            conn = build_connector(
                mc.connector, projector.linear_1.in_features, text_config.hidden_size, hidden=mc.connector_hidden
            )
        for ours, linear in zip(conn.linears(), theirs):
            ours.weight, ours.bias = linear.weight, linear.bias
        folder.write_connector(tmp, conn.state_dict())
        folder.write_meta(tmp, dataclasses.asdict(mc), "full", None, source.history, {"imported_from": str(source.src)})


@runtime.quiet_libraries()
def import_llava(src: str, out: str, format: str = "llava-hf", dtype: str | None = None) -> list[str]:
    """Convert a checkpoint in transformers' LLaVA format into a vlmforge model folder.

    The folder then trains, evaluates, chats and serves like any other (same logits as
    transformers). Returns notes on what could not carry over exactly (also printed).

    Args:
        src: folder of a `LlavaForConditionalGeneration` checkpoint (or a Hub id, when online).
        out: output vlmforge model folder.
        format: llava-hf (the only import format).
        dtype: load and write the weights in this dtype (float32, bfloat16, float16); default: as stored.
    """
    if format != "llava-hf":
        raise ValueError(f"unknown import format {format!r} (llava-hf)")
    source = read_llava(src, dtype)
    write_llava_as_vlmforge(source, out)
    for n in source.notes:
        print(f"note: {n}")
    print(f"imported {src} as a vlmforge model in {out}")
    return source.notes
