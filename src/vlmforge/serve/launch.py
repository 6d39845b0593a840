"""Starting and stopping the server: a listening socket, uvicorn, a graceful drain on SIGINT / SIGTERM."""

from __future__ import annotations

import os
import socket
from dataclasses import fields

from vlmforge import runtime
from vlmforge.infer.engine import Engine
from vlmforge.serve.app import Server
from vlmforge.serve.protocol import ServeLimits


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    name: str | None = None,
    allow_remote_images: bool = False,
    max_image_bytes: int = 20_000_000,
    max_image_pixels: int = 40_000_000,
    max_images: int = 8,
    max_body_bytes: int = 64_000_000,
    max_depth: int = 32,
    default_max_tokens: int = 256,
    max_batch: int = 32,
    max_queue: int = 256,
    drain_seconds: float = 10.0,
    dtype: str = "float32",
    compile: bool = False,
) -> None:
    """Serve a model with the OpenAI chat-completions API (/v1/chat/completions, /v1/models, /health).

    Every request the server cannot serve gets an OpenAI error object with a 4xx status naming the
    field (5xx only for overload, 503, and shutdown). Limits beside the flags below: the prompt's
    tokens plus `max_tokens` fit the LM's context (`max_position_embeddings`; else 400
    context_length_exceeded), `max_tokens` at most 2^20, `stop` at most 4 strings, `temperature`
    0-2, `top_p` (0, 1], `n` 1, non-finite numbers (NaN, Infinity, 1e999) refused anywhere.

    Args:
        model: vlmforge model folder.
        host: address to bind (127.0.0.1: this machine only).
        port: TCP port.
        api_key: require `Authorization: Bearer KEY` (default: $VLMFORGE_API_KEY, else no key).
        name: model id clients send (default: the folder's name).
        allow_remote_images: fetch http(s) image URLs (public addresses only); file:// is always refused.
        max_image_bytes: bytes of one image.
        max_image_pixels: width x height of one image.
        max_images: images in one request.
        max_body_bytes: size of the request body (413 beyond).
        max_depth: nesting of objects and arrays in the body (an OpenAI request needs 5).
        default_max_tokens: max_tokens of a request that gives none.
        max_batch: requests decoded together.
        max_queue: requests waiting; beyond, 503.
        drain_seconds: on shutdown, how long running requests may finish before they are ended.
        dtype: the LM's weights as served: float32 (as saved), bfloat16, or int8 (weight-only, one scale
            per output row, torch's int8 kernel; the vision tower and connector stay float32).
        compile: decode one sequence at a time through one compiled graph (float32 on CPUs, Llama-family
            LMs: see docs/engine.md); compiled before the server listens (minutes the first time).
    """
    flags = locals()
    from pathlib import Path

    import uvicorn

    from vlmforge.model.quant import load

    limits = ServeLimits(**{f.name: flags[f.name] for f in fields(ServeLimits) if f.name in flags})
    api_key = api_key or os.environ.get("VLMFORGE_API_KEY") or None
    engine = Engine(load(model, dtype), max_batch=max_batch, max_queue=max_queue, compile=compile)
    if compile:
        why = engine.lm_forward.why_not_compiled
        if why is None:
            step = engine.lm_forward.compiled
            print(f"vlmforge serve: compiling the decode step (projections {step.projections}: {step.why})")
        else:
            print(f"vlmforge serve: not compiled: {why}")
        engine.warm_up()
    server = Server(engine, name or Path(model).resolve().name, limits, api_key, drain_seconds)
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=drain_seconds + 5)
    sock = listen(host, port)
    host, port = sock.getsockname()[:2]
    print(f"vlmforge serve: model {server.name!r} on http://{host}:{port} (OpenAI API at /v1)", flush=True)
    with runtime.long_lived():  # the model, the engine and the libraries, loaded once
        graceful(config, server).run(sockets=[sock])


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket with TCP_NODELAY (inherited by every connection): without it a
    streamed token waits for the client's delayed ACK of the chunk before it (~40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e})") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def graceful(config, server: Server):
    """A uvicorn server that, on SIGINT / SIGTERM, refuses new requests at once and starts draining
    the engine, so that streams still running after `drain_seconds` end with finish_reason
    "abort" rather than being cut."""
    import threading

    import uvicorn

    class Graceful(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not server.stopping:
                server.stopping = True
                threading.Thread(target=server.engine.stop, args=(server.drain_seconds,), daemon=True).start()
            super().handle_exit(sig, frame)

    return Graceful(config)
