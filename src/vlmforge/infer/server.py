"""`vlmforge serve`: an OpenAI-compatible chat-completions server on the engine.

`POST /v1/chat/completions` takes OpenAI's request (messages whose content is a string or a list
of `text` / `image_url` parts, images as `data:image/...;base64,` URLs), answers in OpenAI's
response shape, or with `stream: true` as server-sent `chat.completion.chunk` events ending in
`data: [DONE]` (with `stream_options.include_usage`, a last chunk carries the usage).
`GET /v1/models` and `GET /health` complete what clients (the `openai` package, lmms-eval,
LangChain) ask of a server.

Safe by default: it binds 127.0.0.1; `--api-key` requires `Authorization: Bearer KEY`;
`http(s)://` image URLs are refused unless `--allow-remote-images`, and then fetched only from
public addresses (the address checked is the one connected to; redirects are not followed);
`file://` is always refused. Every refusal is an OpenAI error object with its HTTP status:
400 (malformed JSON, missing or wrong fields, bad base64, not an image, too many pixels, too many
images, prompt too long), 401 (key), 404 (unknown model or path), 413 (body or image bytes too
large), 503 (queue full or shutting down). On shutdown the server stops taking requests, lets
the running ones finish for `--drain-seconds`, then ends the rest (finish_reason "abort").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import http.client
import ipaddress
import json
import socket
import ssl
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmforge.data.images import ImageError, load_image_bytes
from vlmforge.infer.engine import Engine, EngineBusy, Event, ImageInput, PromptTooLong, SamplingParams


@dataclass
class ServeLimits:
    """What one request may hold.

    Args:
        max_image_bytes: bytes of one image (decoded from base64 or downloaded).
        max_image_pixels: width x height of one image.
        max_images: images in one request.
        max_body_bytes: size of the request body.
        default_max_tokens: max_tokens when the request gives none.
        allow_remote_images: fetch http(s) image URLs (public addresses only).
        remote_timeout: seconds for fetching one remote image.
    """

    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 40_000_000
    max_images: int = 8
    max_body_bytes: int = 64_000_000
    default_max_tokens: int = 256
    allow_remote_images: bool = False
    remote_timeout: float = 10.0


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- images -----------------------------------------------------------------------------------
def _check_public(host: str, port: int) -> str:
    """Resolve `host`; every address must be public. Returns the address to connect to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise APIError(400, f"image URL host {host!r} cannot be resolved ({e})", param="messages") from e
    addrs = [info[4][0] for info in infos]
    for a in addrs:
        ip = ipaddress.ip_address(a.split("%")[0])
        if not ip.is_global:
            raise APIError(400, f"image URL host {host!r} resolves to a non-public address ({a}): refused",
                           param="messages", code="image_url_refused")  # fmt: skip
    return addrs[0]


def fetch_remote(url: str, limits: ServeLimits) -> bytes:
    """GET a public http(s) URL, connecting to the address that was checked, no redirects."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise APIError(400, f"image URL {url[:80]!r} has no host", param="messages")
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    addr = _check_public(parts.hostname, port)
    host = parts.hostname

    class Pinned(http.client.HTTPSConnection if https else http.client.HTTPConnection):
        def connect(self):
            sock = socket.create_connection((addr, port), timeout=limits.remote_timeout)
            self.sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host) if https else sock

    conn = Pinned(host, port, timeout=limits.remote_timeout)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path, headers={"User-Agent": "vlmforge", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise APIError(400, f"image URL {url[:80]!r} answered HTTP {resp.status} (redirects are not followed)",
                           param="messages")  # fmt: skip
        data = resp.read(limits.max_image_bytes + 1)
    except (OSError, http.client.HTTPException) as e:
        raise APIError(400, f"image URL {url[:80]!r} cannot be fetched ({type(e).__name__}: {e})",
                       param="messages") from e  # fmt: skip
    finally:
        conn.close()
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"image at {url[:80]!r} is larger than {limits.max_image_bytes} bytes",
                       param="messages", code="image_too_large")  # fmt: skip
    return data


def image_bytes(url: str, limits: ServeLimits, where: str) -> bytes:
    """The bytes of an `image_url` (a base64 data URL, or a remote URL when allowed)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            raise APIError(400, f"{where}: a data URL must be `data:image/...;base64,...`", param="messages")
        if len(payload) > limits.max_image_bytes * 4 // 3 + 8:
            raise APIError(413, f"{where}: image larger than {limits.max_image_bytes} bytes", param="messages",
                           code="image_too_large")  # fmt: skip
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{where}: invalid base64 image data ({e})", param="messages") from e
        if len(data) > limits.max_image_bytes:
            raise APIError(413, f"{where}: image larger than {limits.max_image_bytes} bytes", param="messages",
                           code="image_too_large")  # fmt: skip
        return data
    if scheme in ("http", "https"):
        if not limits.allow_remote_images:
            raise APIError(400, f"{where}: remote image URLs are refused (start the server with --allow-remote-images)",
                           param="messages", code="image_url_refused")  # fmt: skip
        return fetch_remote(url, limits)
    if scheme == "file":
        raise APIError(400, f"{where}: file:// image URLs are refused", param="messages", code="image_url_refused")
    raise APIError(400, f"{where}: unsupported image URL scheme {scheme or url[:20]!r}", param="messages")


# ---- requests -----------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    messages: list[dict]  # vlmforge messages: role + content with <image> markers
    image_urls: list[tuple[str, str]]  # (url, where)
    params: SamplingParams
    stream: bool
    include_usage: bool
    model: str


def _number(body: dict, name: str, kind, default, lo=None, hi=None):
    v = body.get(name, default)
    if v is None:
        return default
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise APIError(400, f"`{name}` must be an integer", param=name)
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise APIError(400, f"`{name}` must be a number", param=name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"`{name}` must be between {lo} and {hi}, got {v}", param=name)
    return v


def parse_chat(body, limits: ServeLimits) -> ChatRequest:
    """Validate an OpenAI chat-completions body (no I/O)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "missing `model` (a string)", param="model")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "missing `messages` (a non-empty list)", param="messages")
    out, urls = [], []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"messages[{i}] needs a `role` of system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, str):
            text = content.replace("<image>", "")  # markers come only from image parts
        elif isinstance(content, list):
            text, last = "", None
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text += ("\n" if last == "image" else (" " if last == "text" else "")) + part["text"].replace(
                        "<image>", "")  # fmt: skip
                    last = "text"
                elif kind == "image_url":
                    iu = part.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    if not isinstance(url, str) or not url:
                        raise APIError(400, f"{where}: `image_url.url` is missing", param="messages")
                    if m["role"] != "user":
                        raise APIError(400, f"{where}: images are accepted in user messages only", param="messages")
                    urls.append((url, where))
                    text += "<image>"
                    last = "image"
                else:
                    shape = "{type: text, text} or {type: image_url, image_url}"
                    raise APIError(400, f"{where}: a content part is {shape}", param="messages")
        elif content is None and m["role"] == "assistant":
            text = ""
        else:
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": text})
    if len(urls) > limits.max_images:
        raise APIError(400, f"{len(urls)} images in one request; at most {limits.max_images}", param="messages",
                       code="too_many_images")  # fmt: skip
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be the assistant's", param="messages")
    if _number(body, "n", int, 1, 1, 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", int, limits.default_max_tokens, 1, 1 << 20)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4):
        raise APIError(400, "`stop` must be a string or a list of at most 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "`seed` must be an integer", param="seed")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", float, 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", float, 1.0, 1e-9, 1)),
        top_k=_number(body, "top_k", int, 0, 0, 1 << 20),
        seed=seed,
        stop=tuple(stop or ()),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "`stream_options` must be an object", param="stream_options")
    return ChatRequest(out, urls, params, bool(body.get("stream", False)), bool(opts.get("include_usage")), model)


# ---- the app ------------------------------------------------------------------------------------
class Server:
    """The engine, the model's prompt builder and the limits; `app()` builds the FastAPI app."""

    def __init__(self, engine: Engine, model_name: str, limits: ServeLimits | None = None,
                 api_key: str | None = None, drain_seconds: float = 10.0):  # fmt: skip
        self.engine, self.name, self.limits = engine, model_name, limits or ServeLimits()
        self.api_key, self.drain_seconds = api_key, drain_seconds
        self.model = engine.model
        self.created = int(time.time())
        self.known_images: dict[str, bool] = {}  # image hashes already decoded and accepted
        self.stopping = False

    def _image(self, data: bytes, where: str) -> ImageInput:
        key = hashlib.blake2b(data, digest_size=16).hexdigest()
        if key not in self.known_images:
            try:
                image = load_image_bytes(data, where, self.limits.max_image_pixels)
            except ImageError as e:
                raise APIError(400, str(e), param="messages", code="invalid_image") from e
            self.known_images[key] = True
            if len(self.known_images) > 100_000:
                self.known_images.pop(next(iter(self.known_images)))
            return ImageInput(key, lambda: image)
        # seen before: decoded again only if its features have left the engine's caches
        return ImageInput(key, lambda: load_image_bytes(data, where, self.limits.max_image_pixels))

    def prepare(self, req: ChatRequest) -> tuple[list[int], list[ImageInput]]:
        """Fetch and check images, render the prompt (blocking: run in a worker thread)."""
        images = [self._image(image_bytes(url, self.limits, where), where) for url, where in req.image_urls]
        prompt = self.model.prompts.encode_prompt(req.messages)
        return prompt, images

    def app(self):
        @asynccontextmanager
        async def lifespan(app):
            self.engine.start()
            yield
            self.stopping = True
            await asyncio.to_thread(self.engine.stop, self.drain_seconds)

        app = FastAPI(title="vlmforge", lifespan=lifespan, docs_url=None, redoc_url=None)

        def error(e: APIError) -> JSONResponse:
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, exc):
            kind = "not_found" if exc.status_code == 404 else None
            return error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind))

        def authorized(request) -> bool:
            if not self.api_key:
                return True
            return request.headers.get("authorization", "") == f"Bearer {self.api_key}"

        unauthorized = APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error",
                                code="invalid_api_key")  # fmt: skip

        @app.get("/health")
        async def health():
            e = self.engine
            return {"status": "stopping" if self.stopping else "ok", "running": len(e.running),
                    "waiting": len(e.waiting)}  # fmt: skip

        @app.get("/v1/models")
        async def models(request: Request):
            if not authorized(request):
                return error(unauthorized)
            return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                                "owned_by": "vlmforge"}]}  # fmt: skip

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            if not authorized(request):
                return error(unauthorized)
            try:
                size = int(request.headers.get("content-length") or 0)
                if size > self.limits.max_body_bytes:
                    raise APIError(413, f"request body of {size} bytes exceeds {self.limits.max_body_bytes}")
                raw = await request.body()
                if len(raw) > self.limits.max_body_bytes:
                    raise APIError(413, f"request body exceeds {self.limits.max_body_bytes} bytes")
                try:
                    body = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise APIError(400, f"malformed JSON body ({e})") from e
                req = parse_chat(body, self.limits)
                if req.model != self.name:
                    raise APIError(404, f"the model {req.model!r} does not exist (served: {self.name!r})",
                                   param="model", code="model_not_found")  # fmt: skip
                if self.stopping:
                    raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
                prompt, images = await asyncio.to_thread(self.prepare, req)
                loop = asyncio.get_running_loop()
                events: asyncio.Queue[Event] = asyncio.Queue()
                try:
                    on_event = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
                    handle = self.engine.submit(prompt, images, req.params, on_event)
                except PromptTooLong as e:
                    raise APIError(400, str(e), param="messages", code="context_length_exceeded") from e
                except EngineBusy as e:
                    raise APIError(503, f"server overloaded: {e}", "server_error", code="overloaded") from e
                except ValueError as e:
                    raise APIError(400, str(e), param="messages") from e
            except APIError as e:
                return error(e)
            rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": len(handle.tokens),  # noqa: E731
                             "total_tokens": len(prompt) + len(handle.tokens),
                             "prompt_tokens_details": {"cached_tokens": handle.cached_tokens}}  # fmt: skip
            if req.stream:
                stream = self._sse(handle, events, rid, created, req, usage)
                headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
            try:
                while True:
                    try:
                        ev = await asyncio.wait_for(events.get(), 1.0)
                    except TimeoutError:
                        if await request.is_disconnected():
                            handle.cancel()
                            return error(APIError(499, "client closed the request"))
                        continue
                    if ev.finish_reason is not None:
                        break
            except asyncio.CancelledError:
                handle.cancel()
                raise
            if ev.finish_reason == "error":
                return error(APIError(500, f"generation failed: {ev.error}", "server_error"))
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": handle.text},
                             "logprobs": None, "finish_reason": ev.finish_reason}],
                "usage": usage(),
            }  # fmt: skip

        return app

    async def _sse(self, handle, events, rid, created, req: ChatRequest, usage):
        def chunk(delta: dict, finish=None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                    "choices": [choice], **extra}  # fmt: skip
            if req.include_usage:
                body.setdefault("usage", None)
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                ev = await events.get()
                if ev.text or ev.token_ids:  # one chunk per token (its text may be held back or empty)
                    yield chunk({"content": ev.text})
                if ev.finish_reason is not None:
                    if ev.finish_reason == "error":
                        err = APIError(500, f"generation failed: {ev.error}", "server_error").body()
                        yield f"data: {json.dumps(err)}\n\n"
                    else:
                        yield chunk({}, ev.finish_reason)
                    break
            if req.include_usage:
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                        "choices": [], "usage": usage()}  # fmt: skip
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): free the slot
            handle.cancel()


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
