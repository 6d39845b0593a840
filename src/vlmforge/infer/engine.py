"""The generation engine under `chat`, `eval` and `serve`: token ids in, token ids (and text) out.

It knows nothing of HTTP. What it does, in the manner of vLLM / SGLang, at toy scale:

* **KV cache in slots.** Every running request owns a slot of a per-layer key/value buffer
  `[slots, kv_heads, length, head_dim]`; the running requests occupy slots `0..B-1`, so a decode
  step is one LM forward over `[B, 1]` tokens with a 4-D mask that hides each slot's unused tail.
  The buffers are handed to the Hugging Face decoder as its `past_key_values` (`SlotCache`), so
  any HF causal LM that takes a custom cache and a 4-D mask runs unchanged (LoRA included).
* **Continuous batching.** Requests wait in a bounded queue; between two decode steps the engine
  admits waiting requests (prefill) and retires finished or cancelled ones, so a short request
  never waits for a long one.
* **Image features once per image** (`vision_cache.VisionCache`) and **prefix KV reuse**
  (`prefix_cache.PrefixCache`): a repeated image skips the encoder and the connector; a prompt that
  starts like an earlier one copies its keys and values and prefills only the rest (when the image
  tokens are covered, the encoder is not run at all).
* **Sampling**: greedy, or temperature / top-k / top-p with a per-request seed; `max_tokens`,
  end-of-turn tokens and stop strings end a request; text is streamed as it is decoded.

Use it synchronously (`generate`, `run_until_done`) or from a background thread (`start`), as
the server does; `submit` is thread-safe.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlmforge.infer.decoder import Decoder
from vlmforge.infer.detokenize import Detokenizer, byte_level_table
from vlmforge.infer.kernels import huge_pages
from vlmforge.infer.kv_cache import SlotCache
from vlmforge.infer.prefix_cache import PrefixCache
from vlmforge.infer.request import EngineBusy, Event, ImageInput, PromptTooLong, Request, SamplingParams
from vlmforge.infer.sampling import sample
from vlmforge.infer.vision_cache import VisionCache


class Engine:
    """Batched generation with a slot KV cache, continuous batching, feature and prefix caches.

    Args:
        model: a `VLM` (eval mode is set).
        max_batch: requests decoded together (slots).
        max_queue: requests waiting beyond the running ones; `submit` raises `EngineBusy` past it.
        max_len: context length (default: the LM's `max_position_embeddings`).
        feature_cache: images whose visual tokens are kept.
        prefix_cache_tokens: prompt tokens whose keys/values are kept for reuse (0: off).
        max_prefills_per_step: new requests admitted (prefilled together) between two decode steps.
        prefill_tokens: prompt tokens prefilled together at most (one request always goes).
        fast: the lean Llama-family forward (`decoder.Decoder`) and the lean SigLIP one
            (`tower.LeanTower`); None: wherever they apply.
        compile: one sequence's decode step as one compiled graph (`infer/compiled.py`: float32 on
            CPUs, the lean forward's LMs; its first step compiles: minutes for a 30-layer LM on 2 cores).
        projections: how the compiled step multiplies by its weights: "rows" (reductions Inductor
            writes), "mm" (torch's matmul), or "auto": the faster on this machine (`compiled.pick`).
    """

    def __init__(
        self,
        model,
        max_batch: int = 32,
        max_queue: int = 256,
        max_len: int | None = None,
        feature_cache: int = 256,
        prefix_cache_tokens: int = 16384,
        max_prefills_per_step: int = 16,
        prefill_tokens: int = 8192,
        fast: bool | None = None,
        compile: bool = False,
        projections: str = "auto",
    ):
        self.model = model.eval()
        lm = model.causal_lm
        cfg = lm.config
        self.embed_tokens = lm.get_input_embeddings()
        self.max_len = max_len or getattr(cfg, "max_position_embeddings", 4096)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        param = next(lm.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.lm_forward = Decoder(model, self.max_len, fast, compile, projections)
        self.head_w = self.lm_forward.head_w
        # on a CPU the cache sits in huge pages, as the weights' tiles do (`huge_pages`)
        alloc = huge_pages if self.device.type == "cpu" else None
        self.cache = SlotCache(cfg.num_hidden_layers, kv_heads, head_dim, self.dtype, self.device, alloc)
        self.max_batch, self.max_queue, self.max_prefills = max_batch, max_queue, max_prefills_per_step
        self.prefill_tokens = prefill_tokens
        self.tok = model.tokenizer
        self.token_bytes = byte_level_table(self.tok)
        self.stop_ids = set(model.prompts.stop_ids)
        self.image_token_id = model.image_token_id
        self.cross_attention = model.cross_attention
        self.stats = collections.Counter()
        self.vision = VisionCache(model, feature_cache, self.dtype, self.stats, lean=fast is not False)
        self.prefixes = PrefixCache(prefix_cache_tokens, model.image_starts, model.cross_attention)
        self.waiting: collections.deque[Request] = collections.deque()
        self.live: set[Request] = set()  # submitted and not finished
        self.running: list[Request] = []  # running[i] holds slot i
        self.lengths: list[int] = []  # tokens in each slot's cache
        self.contexts: list[torch.Tensor | None] = []  # cross-attention: visual tokens per slot
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- submission ---------------------------------------------------------------------------
    def submit(
        self,
        prompt: list[int],
        images: list | None = None,
        params: SamplingParams | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> Request:
        """Queue a request (thread-safe). Images: `ImageInput`s or PIL images, in prompt order."""
        params = params or SamplingParams()
        images = [im if isinstance(im, ImageInput) else ImageInput.from_pil(im) for im in images or []]
        if not prompt:
            raise ValueError("empty prompt")
        starts = self.model.image_starts(prompt)
        if len(starts) != len(images):
            raise ValueError(f"the prompt has {len(starts)} image blocks but {len(images)} images were given")
        if not self.cross_attention:  # each block holds the visual tokens its image makes
            for k, (im, start, end) in enumerate(zip(images, starts, self.model.image_ends(prompt))):
                have = prompt[start : end + 1].count(self.image_token_id)
                want = self.model.image_token_count(im.size) if im.size else have
                if have != want:
                    size = f"{im.size[0]}x{im.size[1]}"
                    raise ValueError(
                        f"image {k} ({size}) makes {want} visual tokens but its block in the prompt "
                        f"holds {have} (build the prompt with the image's size)"
                    )
        if len(prompt) + params.max_tokens > self.max_len:
            raise PromptTooLong(
                f"the prompt has {len(prompt)} tokens; with max_tokens {params.max_tokens} that exceeds "
                f"the context of {self.max_len} tokens"
            )
        req = Request(list(prompt), images, params, on_event)
        req.detok = Detokenizer(self.tok, self.token_bytes, req.params.stop)
        with self._lock:
            if self._stopping:
                raise EngineBusy("the engine is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue})")
            self.waiting.append(req)
            self.live.add(req)
            self._lock.notify()
        return req

    def warm_up(self) -> None:
        """Compile the decode step now (`compile=True`) with one short answer to a text-only
        question, so that no request waits for it; nothing to do otherwise."""
        if self.lm_forward.compiled is not None:
            self.generate([self.model.build_prompt("hello", 0)], [[]], SamplingParams(max_tokens=4, ignore_eos=True))

    def generate(
        self, prompts: list[list[int]], images: list[list] | None = None, params: SamplingParams | None = None
    ) -> list[Request]:
        """Submit a batch and wait for all of it (driving the engine here unless it runs in a thread)."""
        reqs = []
        for i, p in enumerate(prompts):
            while True:
                try:
                    reqs.append(self.submit(p, images[i] if images else None, params))
                    break
                except EngineBusy:
                    if self._thread is not None:
                        time.sleep(0.001)
                    else:
                        self.step()
        if self._thread is None:
            while not all(r.done for r in reqs):
                self.step()
        for r in reqs:
            r.wait()
        return reqs

    def run_until_done(self) -> None:
        while self.waiting or self.running:
            self.step()

    # ---- the background loop ------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vlmforge-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self.waiting and not self.running and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self.waiting and not self.running:
                    return
            try:
                self.step()
            except Exception as e:  # a bug must not leave clients waiting forever
                for r in list(self.running) + list(self.waiting):
                    r.error = f"{type(e).__name__}: {e}"
                    self._finish(r, "error")
                self.running, self.lengths, self.contexts = [], [], []
                self.waiting.clear()

    def stop(self, drain_seconds: float = 10.0) -> None:
        """Refuse new requests, let the admitted ones finish for up to `drain_seconds`, then end
        the rest with finish_reason "abort"."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        deadline = time.monotonic() + drain_seconds
        while self.live and time.monotonic() < deadline:  # (a request being prefilled is in neither queue)
            if self._thread is None:
                self.step()
            else:
                time.sleep(0.005)
        for r in list(self.live):
            r.cancel()
        if self._thread is not None:
            self._thread.join(timeout=30)
        else:
            self.run_until_done()

    # ---- one step: admit, then decode ---------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        self._retire_cancelled()
        batch, tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_batch and len(batch) < self.max_prefills:
            with self._lock:
                req = self.waiting[0]
                if batch and tokens + len(req.prompt) > self.prefill_tokens:
                    break
                self.waiting.popleft()
            if req.cancelled:
                self._finish(req, "abort")
                continue
            batch.append(req)
            tokens += len(req.prompt)
        if batch:
            try:
                self._prefill_batch(batch)
            except Exception as e:  # a failure of the batch's forward: its requests fail, others go on
                for req in batch:
                    if req in self.running:
                        self._release(self.running.index(req), "error")
                    req.error = req.error or f"{type(e).__name__}: {e}"
                    self._finish(req, "error")
        if self.running:
            self._decode()

    def _retire_cancelled(self) -> None:
        for i in reversed(range(len(self.running))):
            if self.running[i].cancelled:
                self._release(i, "abort")

    def _prefill_batch(self, reqs: list[Request]) -> None:
        """Admit `reqs`: reuse cached prefixes, encode their new images in one batch, run the rest
        of every prompt through the LM in one padded forward, and sample each first token."""
        base = len(self.running)
        self.cache.reserve(base + len(reqs), max(len(r.prompt) + r.params.max_tokens for r in reqs), self.max_len)
        starts, hashes, needed, decoded, have = [], [], [], {}, {}
        for req in list(reqs):  # images are decoded first: a bad one fails its request alone
            h = self.prefixes.hashes(req)
            start = self.prefixes.lookup(h, self.cache, base + len(starts))
            need = self.vision.needed(req, start)
            try:
                self.vision.gather(need, have, decoded)
            except Exception as e:
                req.error = f"{type(e).__name__}: {e}"
                self._finish(req, "error")
                reqs.remove(req)
                continue
            starts.append(start)
            hashes.append(h)
            needed.append(need)
        if not reqs:
            return
        self.stats["images"] += sum(len(r.images) for r in reqs)
        have.update(self.vision.encode(decoded, self.device))  # visual tokens of every image this batch needs
        n = [len(r.prompt) for r in reqs]
        q = [a - b for a, b in zip(n, starts)]
        width, length = max(q), max(n)
        pad = 0
        ids = torch.tensor(
            [r.prompt[s:] + [pad] * (width - len(r.prompt) + s) for r, s in zip(reqs, starts)], device=self.device
        )
        embeds = F.embedding(ids, self.embed_tokens.weight)  # [N, W, D]
        contexts = []
        for i, need in enumerate(needed):
            vis = [have[im.key] for im in need]
            if self.cross_attention:
                contexts.append(torch.cat(vis) if vis else None)
            elif vis:
                mask = ids[i, : q[i]] == self.image_token_id
                flat = torch.cat(vis)
                embeds[i, : q[i]][mask] = flat[flat.shape[0] - int(mask.sum()) :]
        start_t = torch.tensor(starts, device=self.device)[:, None]
        pos = (start_t + torch.arange(width, device=self.device)[None]).clamp(max=self.max_len - 1)  # [N, W]
        if self.lm_forward.fast and not any(starts) and min(n) == width:
            mask = None  # no cached prefix, no padding: causal attention over the new tokens says it all
        else:
            keys = torch.arange(length, device=self.device)[None, None]  # [1, 1, L]
            n_t = torch.tensor(n, device=self.device)[:, None, None]
            allowed = (keys <= pos[:, :, None]) & (keys < n_t)  # [N, W, L]
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~allowed, torch.finfo(self.dtype).min
            )[:, None]
        self.cache.prefill(base, starts, q)
        context = self._context(contexts) if contexts else None
        rows = torch.tensor(q, device=self.device) - 1  # each prompt's last position: its first token's
        last = self.lm_forward.forward(embeds, pos, mask, self.cache, context, rows)[:, 0]  # [N, D]
        logits = self._logits(last)  # [N, V]
        for i, req in enumerate(reqs):
            req.cached_tokens = starts[i]
            self.running.append(req)
            self.lengths.append(n[i])
            self.contexts.append(contexts[i] if contexts else None)
            self.stats["prompt_tokens"] += n[i]
            self.stats["cached_tokens"] += starts[i]
            self.prefixes.keep(hashes[i], self.cache, base + i, starts[i])  # for later requests
        tokens = self._sample(logits, reqs)
        for i in reversed(range(len(reqs))):  # reversed: releasing a slot moves the last one into it
            self._accept(base + i, tokens[i])

    def _context(self, contexts: list) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cross-attention: the slots' visual tokens, padded, and which are real. [B, W, D], [B, W]"""
        if not self.cross_attention:
            return None
        width = max([c.shape[0] for c in contexts if c is not None] + [1])
        dim = self.embed_tokens.weight.shape[1]
        ctx = torch.zeros(len(contexts), width, dim, dtype=self.dtype, device=self.device)
        valid = torch.zeros(len(contexts), width, dtype=torch.bool, device=self.device)
        for i, c in enumerate(contexts):
            if c is not None:
                ctx[i, : c.shape[0]] = c
                valid[i, : c.shape[0]] = True
        return ctx, valid

    def _decode(self) -> None:
        b = len(self.running)
        top = max(self.lengths)  # where each new token goes: lengths[i]
        width = top + 1
        self.cache.reserve(b, width, self.max_len)
        # the whole step in one call of the engine's kernels where they take it, else the forward
        stepped = self.lm_forward.decode([r.tokens[-1] for r in self.running], self.lengths, self.cache)
        logits, greedy = stepped if stepped is not None else (self._forward_step(top, width), None)
        for i in range(b):
            self.lengths[i] += 1
        nxt = self._sample(logits, self.running, greedy)
        self.stats["decode_steps"] += 1
        for i in reversed(range(b)):  # reversed: releasing slot i moves the last slot into it
            self._accept(i, nxt[i])

    def _forward_step(self, top: int, width: int) -> torch.Tensor:
        """A decode step through `Decoder.forward`: the logits [B, V]."""
        last = torch.tensor([[r.tokens[-1]] for r in self.running], device=self.device)  # [B, 1]
        if min(self.lengths) == top:  # every slot at the same position: nothing to hide, one write
            mask, positions = None, top
            self.cache.decode(top, width)
        else:
            pos = torch.tensor(self.lengths, device=self.device)
            mask = torch.where(
                torch.arange(width, device=self.device)[None] <= pos[:, None], 0.0, torch.finfo(self.dtype).min
            ).to(self.dtype)[:, None, None, :]
            self.cache.decode(pos, width)
            positions = pos[:, None]
        embeds = F.embedding(last, self.embed_tokens.weight)  # [B, 1, D]
        hidden = self.lm_forward.forward(embeds, positions, mask, self.cache, self._context(self.contexts))
        return self._logits(hidden[:, -1])  # [B, V]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, V], float32
        logits = self.lm_forward.logits(hidden)  # where the step computed them with the layers
        return (self.head_w(hidden) if logits is None else logits).float()

    def _sample(self, logits: torch.Tensor, reqs: list[Request], greedy: list[int] | None = None) -> list[int]:
        return sample(logits, [r.params for r in reqs], [r.generator for r in reqs], greedy)

    def _accept(self, slot: int, token: int) -> None:
        req = self.running[slot]
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        p = req.params
        if token in self.stop_ids and not p.ignore_eos:
            self._release(slot, "stop")
            return
        req.tokens.append(token)
        self.stats["generated_tokens"] += 1
        stopped = self._detokenize(req)
        if stopped:
            self._release(slot, "stop")
        elif len(req.tokens) >= p.max_tokens or self.lengths[slot] + 1 >= self.max_len:
            self._release(slot, "length")

    def _detokenize(self, req: Request) -> bool:
        """Emit the new token's text (what cannot start a stop string); True at a stop string."""
        text, stopped = req.detok.push(req.tokens)
        self._send(req, text, [req.tokens[-1]])
        return stopped

    def _send(self, req: Request, text: str, ids: list[int]) -> None:
        req.text += text
        req.emit(Event(text, ids))

    def _release(self, slot: int, reason: str) -> None:
        req = self.running[slot]
        last = len(self.running) - 1
        if slot != last:  # keep running requests in slots 0..B-1
            self.cache.move(last, slot, self.lengths[last])
            self.running[slot], self.lengths[slot], self.contexts[slot] = (
                self.running[last],
                self.lengths[last],
                self.contexts[last],
            )
        self.running.pop()
        self.lengths.pop()
        self.contexts.pop()
        self._finish(req, reason)

    def _finish(self, req: Request, reason: str) -> None:
        if req.done:
            return
        tail = req.detok.flush() if req.detok is not None else ""
        req.text += tail
        req.finish_reason = reason
        req.finished_at = time.perf_counter()
        self.live.discard(req)
        req.end(Event(tail, [], reason, req.error))


def answer(
    model,
    questions: list[str],
    images: list[list] | None = None,
    max_new_tokens: int = 32,
    engine: Engine | None = None,
) -> list[str]:
    """Greedy answers to one user message each, with its images (PIL; `images[i]` for `questions[i]`),
    batched by `engine` (a new one over `model` when none is given): the one question -> answer
    path of the demo and the evaluators. A question that holds no `<image>` marker gets one per
    image in front of it, as `VLM.build_prompt` writes them."""
    engine = engine or Engine(model)
    images = images or [[] for _ in questions]
    prompts = [
        model.prompts.encode_prompt([{"role": "user", "content": q}], [im.size for im in ims])
        if "<image>" in q
        else model.build_prompt(q, images=ims)
        for q, ims in zip(questions, images)
    ]
    reqs = engine.generate(prompts, images, SamplingParams(max_tokens=max_new_tokens))
    return [r.text.strip() for r in reqs]
