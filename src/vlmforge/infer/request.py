"""A generation request and what it asks for: sampling settings, images by content hash, the
events it streams, and the errors of a full queue or a prompt too long. The engine (`infer.engine`)
runs requests; the server and chat make them."""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlmforge.infer.detokenize import Detokenizer


class EngineBusy(RuntimeError):
    """The waiting queue is full."""


class PromptTooLong(ValueError):
    """The prompt (plus the requested tokens) does not fit the context."""


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_tokens

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if len(self.stop) > 8:
            raise ValueError(f"at most 8 stop strings, got {len(self.stop)}")


@dataclass
class ImageInput:
    """An image, its content hash and its (width, height); `load` is called only when its features
    are needed."""

    key: str
    load: Callable
    size: tuple[int, int] | None = None

    @classmethod
    def from_pil(cls, image) -> ImageInput:
        h = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=16)
        h.update(image.tobytes())
        return cls(h.hexdigest(), lambda: image, image.size)


@dataclass
class Event:
    """What a request produced since the last event: new text and token ids; `finish_reason`
    ("stop", "length", "abort", "error") on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: list[int]
    images: list[ImageInput]
    params: SamplingParams
    on_event: Callable[[Event], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the text emitted so far
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self):
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancel = False
        self.detok: Detokenizer | None = None  # set by the engine that runs it
        self.generator = None if self.params.seed is None else torch.Generator().manual_seed(self.params.seed)

    def cancel(self) -> None:
        """End the request at the next step; its slot is freed."""
        self._cancel = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Request:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self

    def stream(self, timeout: float | None = None):
        """Yield events until the request ends (blocking; for threads, not for event loops)."""
        while True:
            ev = self._events.get(timeout=timeout)
            yield ev
            if ev.finish_reason is not None:
                return

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted

    @property
    def cancelled(self) -> bool:
        return self._cancel

    def emit(self, ev: Event) -> None:
        """Hand an event to the request's callback, or to its `stream`."""
        if self.on_event is not None:
            self.on_event(ev)
        else:
            self._events.put(ev)

    def end(self, ev: Event) -> None:
        """The last event (with its finish reason): the request is done."""
        self.emit(ev)
        self._done.set()
