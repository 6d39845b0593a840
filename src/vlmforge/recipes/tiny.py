"""Tiny backbones made from scratch on synthetic data, saved in the real formats.

Real users load e.g. `google/siglip-so400m-patch14-384` and `meta-llama/Meta-Llama-3-8B-Instruct`.
The demo and the tests cannot download them, so they make small ones with the same classes and
save them with `save_pretrained`; everything downstream loads them with `from_pretrained`, the
same code that loads a Hub checkpoint:

* a byte-level BPE tokenizer (HF `tokenizers`) with a Llama-3-style chat template and the special
  tokens `<image>`, `</image>`, `<text>`, `</text>`, `<|image_pad|>`;
* a SigLIP model (transformers' `SiglipModel`) pretrained with SigLIP's pairwise sigmoid loss
  (Zhai et al. 2023) on image-caption pairs; identical captions in a batch count as positives;
* a Llama (`LlamaForCausalLM`) pretrained on the text of the synthetic conversations.
"""

from __future__ import annotations

import math
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vlmforge import runtime
from vlmforge.config import TinySpec
from vlmforge.data.formats import Record
from vlmforge.data.images import ImageProcessor, load_image
from vlmforge.data.prompts import SPECIAL_TOKENS
from vlmforge.io import atomic_dir
from vlmforge.train.loop import lr_lambda

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CONTROL_TOKENS = ["<|begin_of_text|>", "<|eot_id|>", "<|pad|>", "<|start_header_id|>", "<|end_header_id|>"]


def _batches(rng: random.Random, pool: list[int], size: int):
    """Endless batches of `size` indices: shuffled passes over `pool`."""
    order: list[int] = []
    while True:
        if len(order) < size:
            order += rng.sample(pool, len(pool))
        yield order[:size]
        order = order[size:]


def _optimize(model, loss_of, batches, steps: int, lr: float, weight_decay: float, desc: str) -> float:
    """AdamW with warm-up + cosine and clipping for `steps`; returns the last loss. `loss_of` may
    return several losses (objectives): each one's gradient is clipped on its own before they are
    summed, so that one objective's larger gradients do not shrink the other's steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, max(1, steps // 10), 0.0))
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step")
    loss = torch.tensor(float("nan"))
    for _ in bar:
        losses = loss_of(next(batches))
        losses = losses if isinstance(losses, tuple) else (losses,)
        total = [torch.zeros_like(p) for p in params] if len(losses) > 1 else None
        for part in losses:
            part.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if total is not None:
                for t, p in zip(total, params):
                    if p.grad is not None:
                        t += p.grad
                        p.grad = None
        if total is not None:
            for t, p in zip(total, params):
                p.grad = t
        loss = sum(part.detach() for part in losses)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


def train_tokenizer(texts: list[str], out: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE on `texts` and save it as an HF tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = CONTROL_TOKENS + SPECIAL_TOKENS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS + ["<|start_header_id|>", "<|end_header_id|>"],
    )
    tok.chat_template = LLAMA3_TEMPLATE
    with atomic_dir(out) as tmp:
        tok.save_pretrained(tmp)
    return tok


def caption_phrases(caption: str) -> frozenset[str]:
    """The phrases of a list caption: "a red circle, a blue square and a green triangle" → 3 phrases."""
    return frozenset(p.strip() for p in re.split(r",\s*|\s+and\s+", caption) if p.strip())


def _log(msg: str) -> None:
    tqdm.write(msg)


class ConvSiglip(nn.Module):
    """SigLIP's dual encoder with a convolutional image tower. A whole caption is scored against
    the tower's pooled map; a phrase naming one object ("a red circle") against each cell of the
    map, keeping the best cell (multiple-instance learning, as FILIP's token-wise matching), so
    that each cell learns the object it holds, colour and shape bound together: the visual tokens
    the LM later reads. Logits as SigLIP's, t' = log 10 and b = -10 at the start."""

    def __init__(self, vision: nn.Module, text: nn.Module, width: int):
        super().__init__()
        self.vision, self.text = vision, text
        self.proj = nn.Linear(vision.config.hidden_sizes[-1], width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, per_cell: torch.Tensor) -> torch.Tensor:
        fmap = self.vision(pixel_values=pixel_values).last_hidden_state  # [B, C, H, W]
        cells = F.normalize(self.proj(fmap.flatten(2).transpose(1, 2)), dim=-1)  # [B, HW, E]
        pooled = F.normalize(self.proj(fmap.mean((2, 3))), dim=-1)  # [B, E]
        txt = F.normalize(self.text(input_ids=input_ids).pooler_output, dim=-1)  # [T, E]
        best = torch.einsum("bpe,te->btp", cells, txt).amax(-1)  # [B, T]
        sim = torch.where(per_cell[None], best, pooled @ txt.T)
        return sim * self.logit_scale.exp() + self.logit_bias  # [B, T]

    def reading_cells(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's last map as a sequence in reading order (column by column, left to right,
        each column top to bottom): what the transcription objective reads. [B, W*H, C]"""
        fmap = self.vision(pixel_values=pixel_values).last_hidden_state  # [B, C, H, W]
        return fmap.permute(0, 3, 2, 1).flatten(1, 2)


def _dual_encoder(spec: TinySpec, tokenizer) -> tuple[nn.Module, nn.Module, object]:
    """(dual encoder whose forward gives image-text logits [B, T], the part saved as the vision
    encoder, its image processor), as `spec.vision_kind` says."""
    from transformers import (
        ConvNextImageProcessor,
        ResNetModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipTextConfig,
        SiglipTextModel,
    )

    tcfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=max(1, spec.text_hidden // 32),
        intermediate_size=4 * spec.text_hidden,
        max_position_embeddings=spec.text_len,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if spec.vision_kind == "resnet":
        vision = ResNetModel(spec.resnet_config())
        text = SiglipTextModel(SiglipTextConfig(**tcfg, projection_size=spec.conv_hidden[-1]))
        proc = ConvNextImageProcessor(
            size={"shortest_edge": spec.image_size}, crop_pct=1.0, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
        return ConvSiglip(vision, text, spec.conv_hidden[-1]), vision, proc
    if spec.vision_kind != "vit":
        raise ValueError(f"unknown tiny vision kind {spec.vision_kind!r} (resnet or vit)")
    vcfg = dict(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        intermediate_size=4 * spec.vision_hidden,
    )
    model = SiglipModel(SiglipConfig(vision_config=vcfg, text_config={**tcfg, "projection_size": spec.vision_hidden}))
    with torch.no_grad():  # the paper's initialisation: t' = log 10, b = -10
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)

    class _Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, pixel_values, per_cell=None):
            return self.model(input_ids=input_ids, pixel_values=pixel_values).logits_per_image

        def reading_cells(self, pixel_values):  # the patch grid column by column, as ConvSiglip's
            patches = self.model.vision_model(pixel_values=pixel_values).last_hidden_state  # [B, P, D]
            side = spec.image_size // spec.patch_size
            return patches.view(-1, side, side, patches.shape[-1]).transpose(1, 2).flatten(1, 2)

    proc = SiglipImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return _Logits(), model, proc


def greedy_ctc(log_probs: torch.Tensor, alphabet: str) -> list[str]:
    """Best-path CTC decoding of [B, T, 1 + len(alphabet)] (class 0 the blank): repeats merged, blanks dropped."""
    out = []
    for row in log_probs.argmax(-1).tolist():
        chars, prev = [], 0
        for c in row:
            if c and c != prev:
                chars.append(alphabet[c - 1])
            prev = c
        out.append("".join(chars))
    return out


class Reader(nn.Module):
    """The reading objective of the tower's pretraining (a CRNN's CTC head, Shi et al. 2015): each
    cell of the last map, in reading order, classifies one character or the blank, and CTC sums over
    every alignment of the transcription to the cells, so no cell is told which letter is its own.
    It teaches the tower to read, which a caption loss never does when every string is new (Pix2Struct
    and Donut warm up their encoders on reading for the same reason). Only the tower is kept."""

    def __init__(self, width: int, alphabet: str):
        super().__init__()
        self.alphabet = alphabet
        self.head = nn.Linear(width, len(alphabet) + 1)

    def targets(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([self.alphabet.index(c) + 1 for t in texts for c in t])
        return ids, torch.tensor([len(t) for t in texts])

    def loss(self, cells: torch.Tensor, texts: list[str]) -> torch.Tensor:
        log_probs = self.head(cells).log_softmax(-1)  # [B, T, C]
        ids, lengths = self.targets(texts)
        steps = torch.full((len(texts),), cells.shape[1])
        loss = F.ctc_loss(log_probs.transpose(0, 1), ids, steps, lengths, reduction="sum", zero_infinity=True)
        return loss / len(texts)  # per image, as SigLIP's loss is

    def read(self, cells: torch.Tensor) -> list[str]:
        return greedy_ctc(self.head(cells).log_softmax(-1), self.alphabet)


def pretrain_siglip(
    records: list[Record],
    tokenizer,
    out: str | Path,
    spec: TinySpec,
    seed: int = 0,
    reading: list[Record] | None = None,
) -> dict:
    """Pretrain a small vision encoder (a ResNet or a SigLIP ViT, `spec.vision_kind`) with SigLIP's
    pairwise sigmoid loss on (image, caption) records; saves the image tower with `save_pretrained`.
    `reading`: (image, transcription) records: each step also trains the tower to read a batch of
    them (`Reader`, weighted by `spec.read_weight`)."""
    with runtime.seeded(seed):
        rng = random.Random(seed)
        model, tower, image_processor = _dual_encoder(spec, tokenizer)
        proc = ImageProcessor(spec.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad")
        pixels = torch.stack([proc(load_image(r.images[0])) for r in records])  # [N, 3, S, S]
        reader, read_val = None, []
        if reading:
            words = [r.messages[-1]["content"] for r in reading]
            alphabet = "".join(sorted(set("".join(words))))
            width = spec.conv_hidden[-1] if spec.vision_kind == "resnet" else spec.vision_hidden
            reader = Reader(width, alphabet)
            model.reader = reader  # its head trains with the rest (and is dropped: only `tower` is saved)
            read_pixels = torch.stack([proc(load_image(r.images[0])) for r in reading])  # [R, 3, S, S]
            order = rng.sample(range(len(reading)), len(reading))
            read_val, read_train = order[: min(256, len(reading) // 5)], order[min(256, len(reading) // 5) :]
            read_batches = _batches(rng, read_train, spec.read_batch)
        captions = [r.messages[-1]["content"] for r in records]
        # Texts are whole captions and their phrases ("a red circle"); a text is a positive for an image
        # when everything it says holds for that image, so identical captions never count as negatives
        # and each object of a scene gets its own supervision.
        image_sets = [caption_phrases(c) for c in captions]
        texts = sorted(set(captions) | {p for c in captions for p in caption_phrases(c)})
        text_index = {t: k for k, t in enumerate(texts)}
        text_sets = [caption_phrases(t) for t in texts]
        text_ids = torch.tensor(
            tokenizer(texts, padding="max_length", truncation=True, max_length=spec.text_len)["input_ids"]
        )
        n_val = min(256, len(records) // 5)  # held out to measure image->caption retrieval
        perm = rng.sample(range(len(records)), len(records))
        val, train_idx = perm[:n_val], perm[n_val:]

        # beside the batch's own captions and phrases, `siglip_texts` phrases of the whole corpus are
        # texts of every batch: each image gets a verdict on many objects it could hold, not only on
        # the few texts its batch happens to draw (far more negatives per step than the batch gives)
        pool = sorted({text_index[p] for s in image_sets for p in s})
        # texts naming one object, scored cell by cell when the tower has cells (`spec.siglip_cells`)
        single = torch.tensor([len(t) == 1 and spec.siglip_cells for t in text_sets])

        def loss_of(idx: list[int] | None) -> tuple[torch.Tensor, ...]:
            """(SigLIP's loss when the step has a caption batch, the reading loss when it reads)."""
            losses = ()
            if idx is not None:
                drawn = [
                    text_index[captions[i] if rng.random() < 0.5 else rng.choice(sorted(image_sets[i]))] for i in idx
                ]
                extra = rng.sample(pool, min(spec.siglip_texts, len(pool)))
                picks = sorted(set(drawn) | set(extra))
                logits = model(text_ids[picks], pixels[idx], single[picks])  # [B, T]
                same = torch.tensor([[float(text_sets[k] <= image_sets[i]) for k in picks] for i in idx])
                losses += (-F.logsigmoid((2 * same - 1) * logits).sum() / len(idx),)
            if reader is not None:
                batch = next(read_batches)
                cells = model.reading_cells(read_pixels[batch])
                losses += (spec.read_weight * reader.loss(cells, [words[i] for i in batch]),)
            return losses

        t0 = time.time()
        # with more reading steps than SigLIP steps, the SigLIP batches are spread evenly among them
        # (every step reads), so that neither objective runs alone long enough to make the tower forget
        steps = max(spec.siglip_steps, spec.read_steps if reader is not None else 0)
        captioned = _batches(rng, train_idx, spec.siglip_batch)
        batches = (
            next(captioned) if (i + 1) * spec.siglip_steps // steps > i * spec.siglip_steps // steps else None
            for i in range(steps)
        )
        desc = f"pretrain {spec.vision_kind} (siglip" + (" + reading)" if reader is not None else " loss)")
        final = _optimize(model, loss_of, batches, steps, spec.siglip_lr, 1e-4, desc)
        with torch.no_grad():
            val_texts = [text_index[captions[i]] for i in val]
            sims = model(text_ids[val_texts], pixels[val], single[val_texts])  # [V, V]
            retrieval = sum(captions[val[j]] == captions[i] for i, j in zip(val, sims.argmax(1).tolist())) / n_val
        _log(f"{spec.vision_kind}: held-out image->caption retrieval top-1 {100 * retrieval:.1f}% among {n_val}")
        info = {"final_loss": final, "seconds": time.time() - t0, "retrieval_top1": retrieval}
        if reader is not None:
            with torch.no_grad():
                read = reader.read(model.reading_cells(read_pixels[read_val]))
            info["reading_exact"] = sum(a == words[i] for a, i in zip(read, read_val)) / len(read_val)
            _log(
                f"{spec.vision_kind}: held-out reading (CTC head) {100 * info['reading_exact']:.1f}% exact "
                f"among {len(read_val)}"
            )
        with atomic_dir(out) as tmp:
            tower.save_pretrained(tmp)
            image_processor.save_pretrained(tmp)
        return info


def pretrain_llama(texts: list[str], tokenizer, out: str | Path, spec: TinySpec, seed: int = 0) -> dict:
    """Pretrain a small LlamaForCausalLM on `texts` (rendered chat conversations)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.lm_hidden,
        intermediate_size=spec.lm_intermediate,
        num_hidden_layers=spec.lm_layers,
        num_attention_heads=spec.lm_heads,
        num_key_value_heads=spec.lm_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with runtime.seeded(seed):
        model = LlamaForCausalLM(cfg)
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def loss_of(idx: list[int]) -> torch.Tensor:
        batch = [enc[i] for i in idx]
        width = max(len(b) for b in batch)
        ids = torch.tensor([b + [tokenizer.pad_token_id] * (width - len(b)) for b in batch])
        mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
        return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss

    t0 = time.time()
    with runtime.threads(spec.lm_threads):
        final = _optimize(
            model,
            loss_of,
            _batches(rng, list(range(len(enc))), spec.lm_batch),
            spec.lm_steps,
            spec.lm_lr,
            0.0,
            "pretrain llama",
        )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"final_loss": final, "seconds": time.time() - t0}


def conversation_texts(records: list[Record], tokenizer) -> list[str]:
    """The conversations of `records` rendered with the chat template, images left out."""
    out = []
    for r in records:
        msgs = [{"role": m["role"], "content": m["content"].replace("<image>", "").strip()} for m in r.messages]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    return out


def pretrain(
    data: list[str],
    out: str,
    spec: TinySpec = TinySpec(),  # noqa: B008
    seed: int = 0,
    force: bool = False,
    captions: list[str] | None = None,
    reading: list[str] | None = None,
) -> dict[str, Path]:
    """Make the tiny backbones (BPE tokenizer, SigLIP encoder, Llama LM) from synthetic data.

    The text of `data` trains the tokenizer and the LM. Each part is written atomically, skipped
    when already present, and its folder printed; returns {tokenizer, vision, lm: folder}.

    Args:
        data: LLaVA JSON files (captions pretrain SigLIP; all text pretrains the LM).
        out: output folder; gets tokenizer/, vision/ and lm/ (each loadable with from_pretrained).
        spec: sizes and pretraining budgets.
        seed: random seed.
        force: remake parts that already exist.
        captions: caption files for SigLIP (default: the --data files named *captions*, else all of
            --data; its one-turn image records are the pairs: a file of one-question sft records
            would otherwise teach it answers such as "yes" as captions).
        reading: files of one-turn image records whose answer is the text the image shows (the
            `text` task's sft file): the encoder also learns to read them (a CTC head on its last map).
    """
    from transformers import AutoTokenizer

    from vlmforge.data.formats import load_records

    out = Path(out)
    records = [r for f in data for r in load_records(f)]
    texts = [r for f in reading or [] for r in load_records(f) if r.images and len(r.messages) == 2]
    if reading and not texts:  # before anything is made
        raise ValueError(f"reading files {', '.join(map(str, reading))} hold no one-turn image records to read")
    paths = {k: out / k for k in ("tokenizer", "vision", "lm")}
    if force or not paths["tokenizer"].is_dir():
        # role names and the blank line of the chat template are part of every turn: learn them too
        corpus = [f"{m['role']}\n\n{m['content'].replace('<image>', '').strip()}" for r in records for m in r.messages]
        train_tokenizer(corpus, paths["tokenizer"], spec.vocab_size)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    if force or not paths["vision"].is_dir():
        sources = captions or [f for f in data if "captions" in Path(f).name]
        pool = [r for f in sources for r in load_records(f)] if sources else records
        caps = [r for r in pool if r.images and len(r.messages) == 2]
        if not caps:
            raise ValueError("SigLIP pretraining needs caption records (one human and one gpt turn with an image)")
        info = pretrain_siglip(caps, tok, paths["vision"], spec, seed, reading=texts)
        _log(
            f"siglip: {len(caps)} pairs"
            + (f", {len(texts)} to read" if texts else "")
            + f", final loss {info['final_loss']:.3f}, {info['seconds']:.0f}s"
        )
    if force or not paths["lm"].is_dir():
        info = pretrain_llama(conversation_texts(records, tok), tok, paths["lm"], spec, seed)
        _log(f"llama: final loss {info['final_loss']:.3f}, {info['seconds']:.0f}s")
    for k, p in paths.items():
        _log(f"{k}: {p}")
    return paths
