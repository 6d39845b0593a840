"""Starting and stopping the server: a listening socket, uvicorn, a graceful drain on SIGINT / SIGTERM."""

from __future__ import annotations

import socket

from vlmforge.infer.engine import Engine
from vlmforge.serve.app import Server
from vlmforge.serve.protocol import ServeLimits


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          name: str | None = None, limits: ServeLimits | None = None, max_batch: int = 32, max_queue: int = 256,
          drain_seconds: float = 10.0, sock: socket.socket | None = None) -> None:  # fmt: skip
    """Load the model and serve it until interrupted (SIGINT / SIGTERM: graceful)."""
    from pathlib import Path

    import uvicorn

    from vlmforge.model.vlm import VLM

    model = VLM.from_pretrained(model_dir)
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue)
    server = Server(engine, name or Path(model_dir).resolve().name, limits, api_key, drain_seconds)
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=drain_seconds + 5)
    sock = sock or listen(host, port)
    host, port = sock.getsockname()[:2]
    print(f"vlmforge serve: model {server.name!r} on http://{host}:{port} (OpenAI API at /v1)", flush=True)
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
