"""llama.cpp itself, driven through llama-cpp-python's bindings of its C API (`llama_decode` and
libmtmd): an exported LM GGUF and its projector file (`--mmproj`), greedy, one or several
sequences at once. What `bench generate --vs llama.cpp` times and what the tests compare
vlmforge's answers with; the image is decoded, preprocessed and encoded by llama.cpp's own code.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

_QUIET = None  # the no-op log callback handed to llama.cpp (kept alive: C holds a pointer to it)


def _quiet() -> None:
    """Silence llama.cpp's and libmtmd's logging (they write to stderr from C)."""
    global _QUIET
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    if _QUIET is None:
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_QUIET, None)
        mtmd.mtmd_log_set(_QUIET, None)
        mtmd.mtmd_helper_log_set(_QUIET, None)


class LlamaCppError(RuntimeError):
    """llama.cpp could not load or run a file (the message names it)."""


class LlamaCpp:
    """An LM (and optionally its projector) loaded in llama.cpp, with room for `n_seq` sequences of
    `n_ctx` tokens each; `threads` CPU threads for every graph (LM and image encoder).
    `extra_buffers`: llama.cpp's extra buffer types (weights repacked for the CPU's fastest
    kernels, AMX tiles), its default; see `extra_buffers_work`."""

    def __init__(
        self,
        lm: str | Path,
        mmproj: str | Path | None = None,
        n_ctx: int = 512,
        n_seq: int = 1,
        threads: int = 2,
        extra_buffers: bool = True,
    ):
        import llama_cpp
        import numpy as np

        self._c, self._np = llama_cpp, np
        _quiet()
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(str(lm).encode(), mp)
        if not self.model:
            raise LlamaCppError(f"llama.cpp cannot load {lm}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = n_ctx * n_seq, n_seq, True
        cp.n_batch = cp.n_ubatch = max(n_ctx, n_seq)
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise LlamaCppError(f"llama.cpp cannot make a context of {n_ctx} x {n_seq} tokens for {lm}")
        self.n_batch, self.n_seq = cp.n_batch, n_seq
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.mtmd = None
        if mmproj is not None:
            import llama_cpp.mtmd_cpp as mtmd

            params = mtmd.mtmd_context_params_default()
            params.use_gpu, params.n_threads, params.print_timings = False, threads, False
            self.mtmd = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.model, params)
            if not self.mtmd:
                self.close()
                raise LlamaCppError(f"llama.cpp cannot load the projector {mmproj}")

    def close(self) -> None:
        c = self._c
        if self.mtmd:
            import llama_cpp.mtmd_cpp as mtmd

            mtmd.mtmd_free(self.mtmd)
            self.mtmd = None
        if self.ctx:
            c.llama_batch_free(self.batch)
            c.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            c.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def clear(self) -> None:
        """Forget every sequence."""
        self._c.llama_memory_clear(self._c.llama_get_memory(self.ctx), True)

    def _argmax(self, i: int) -> int:
        ptr = self._c.llama_get_logits_ith(self.ctx, i)
        return int(self._np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def decode(self, tokens: list[int], positions: list[int], seqs: list[int], logits: list[bool]) -> list[int]:
        """One `llama_decode` of `tokens` (token i of sequence seqs[i] at positions[i]); the greedy
        next token of each row whose `logits` is set, in order."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (t, p, s, out) in enumerate(zip(tokens, positions, seqs, logits)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = t, p, 1, s, out
        if self._c.llama_decode(self.ctx, b) != 0:
            raise LlamaCppError(f"llama_decode failed on a batch of {len(tokens)} tokens")
        return [self._argmax(i) for i, out in enumerate(logits) if out]

    def prefill_text(self, ids: list[int], seq: int = 0, at: int = 0) -> int:
        """Evaluate `ids` into sequence `seq` from position `at`; the greedy next token."""
        nxt = None
        for k in range(0, len(ids), self.n_batch):
            part = ids[k : k + self.n_batch]
            last = [False] * (len(part) - 1) + [k + len(part) == len(ids)]
            got = self.decode(part, list(range(at + k, at + k + len(part))), [seq] * len(part), last)
            nxt = got[0] if got else nxt
        return nxt

    def prefill(self, text: str, image: bytes, seq: int = 0) -> tuple[int, int]:
        """`text` (special tokens parsed, llama.cpp's media marker `<__media__>` where the image
        goes) with `image` (encoded file bytes) into sequence `seq`: (greedy next token, positions used)."""
        import llama_cpp.mtmd_cpp as mtmd

        if self.mtmd is None:
            raise LlamaCppError("no projector file (mmproj) was loaded: cannot take an image")
        buf = (ctypes.c_uint8 * len(image)).from_buffer(bytearray(image))
        bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self.mtmd, buf, len(image), False)
        if not bitmap:
            raise LlamaCppError("llama.cpp cannot decode the image")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            prompt = mtmd.mtmd_input_text()
            raw = text.encode()
            prompt.text, prompt.text_len, prompt.add_special, prompt.parse_special = raw, len(raw), False, True
            one = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(prompt), one, 1) != 0:
                raise LlamaCppError("llama.cpp cannot tokenize the prompt with its image (one media marker?)")
            past = self._c.llama_pos(0)
            done = mtmd.mtmd_helper_eval_chunks(
                self.mtmd, self.ctx, chunks, 0, seq, self.n_batch, True, ctypes.byref(past)
            )
            if done != 0:
                raise LlamaCppError("llama.cpp failed to evaluate the prompt with its image")
            return self._argmax(-1), past.value
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def greedy(self, firsts: list[int], positions: list[int], n: int) -> list[list[int]]:
        """`n` greedy tokens for each prefilled sequence 0..len(firsts)-1, decoded together: one
        `llama_decode` a step for all of them (llama.cpp's own batching)."""
        out = [[t] for t in firsts]
        pos = list(positions)
        seqs = list(range(len(firsts)))
        for _ in range(n - 1):
            nxt = self.decode([o[-1] for o in out], pos, seqs, [True] * len(out))
            for o, t in zip(out, nxt):
                o.append(t)
            pos = [p + 1 for p in pos]
        return out


def extra_buffers_work(lm: str | Path, threads: int = 2) -> bool:
    """Whether llama.cpp survives a decode of `lm` with its extra buffer types, tried in a child
    process: on some machines their repacked quantized kernels crash the process (a q8_0 file on a
    virtual CPU that reports AMX), which would take the caller down with it."""
    import subprocess
    import sys

    code = (
        "import sys; from vlmforge.bench.llamacpp import LlamaCpp\n"
        "with LlamaCpp(sys.argv[1], n_ctx=16, threads=int(sys.argv[2])) as L: L.prefill_text([1, 2, 3, 4])"
    )
    done = subprocess.run([sys.executable, "-c", code, str(lm), str(threads)], capture_output=True, timeout=300)
    return done.returncode == 0
