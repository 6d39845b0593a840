"""The FastAPI app: its routes over the engine (chat completions, streamed or not, models, health,
the playground), at module level; each finds the `Server` it serves in `app.state.server`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmforge.data.images import ImageError, load_image_bytes
from vlmforge.infer.engine import Engine
from vlmforge.infer.request import EngineBusy, Event, ImageInput, PromptTooLong
from vlmforge.serve.images import image_bytes
from vlmforge.serve.protocol import APIError, ChatRequest, ServeLimits, load_body, parse_chat

PLAYGROUND = Path(__file__).with_name("playground.html")  # the chat page served at /


class Server:
    """The engine, the model's prompt builder and the limits; `app()` builds the FastAPI app."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        limits: ServeLimits | None = None,
        api_key: str | None = None,
        drain_seconds: float = 10.0,
    ):
        self.engine, self.name, self.limits = engine, model_name, limits or ServeLimits()
        self.api_key, self.drain_seconds = api_key, drain_seconds
        self.model = engine.model
        self.created = int(time.time())
        self.known_images: dict[str, tuple] = {}  # sizes of the images already decoded and accepted, by hash
        self.stopping = False

    def _image(self, data: bytes, where: str) -> ImageInput:
        key = hashlib.blake2b(data, digest_size=16).hexdigest()
        if key not in self.known_images:
            try:
                image = load_image_bytes(data, where, self.limits.max_image_pixels)
            except ImageError as e:
                raise APIError(400, str(e), param="messages", code="invalid_image") from e
            self.known_images[key] = image.size
            if len(self.known_images) > 100_000:
                self.known_images.pop(next(iter(self.known_images)))
            return ImageInput(key, lambda: image, image.size)
        # seen before: decoded again only if its features have left the engine's caches
        return ImageInput(
            key, lambda: load_image_bytes(data, where, self.limits.max_image_pixels), self.known_images[key]
        )

    def prepare(self, req: ChatRequest) -> tuple[list[int], list[ImageInput]]:
        """Fetch and check images, render the prompt (blocking: run in a worker thread)."""
        images = [self._image(image_bytes(url, self.limits, where), where) for url, where in req.image_urls]
        prompt = self.model.prompts.encode_prompt(req.messages, [im.size for im in images])
        return prompt, images

    def authorized(self, request: Request) -> bool:
        return not self.api_key or request.headers.get("authorization", "") == f"Bearer {self.api_key}"

    @asynccontextmanager
    async def lifespan(self, app):
        self.engine.start()
        yield
        self.stopping = True
        await asyncio.to_thread(self.engine.stop, self.drain_seconds)

    def app(self) -> FastAPI:
        app = FastAPI(title="vlmforge", lifespan=self.lifespan, docs_url=None, redoc_url=None)
        app.state.server = self
        app.add_exception_handler(StarletteHTTPException, http_error)
        app.include_router(router)
        return app

    async def submit(self, request: Request):
        """A chat request read, checked and handed to the engine: (request, prompt, handle, the
        queue its events arrive in); whatever is wrong raises an `APIError`."""
        size = int(request.headers.get("content-length") or 0)
        if size > self.limits.max_body_bytes:
            raise APIError(413, f"request body of {size} bytes exceeds {self.limits.max_body_bytes}")
        raw = await request.body()
        if len(raw) > self.limits.max_body_bytes:
            raise APIError(413, f"request body exceeds {self.limits.max_body_bytes} bytes")
        req = parse_chat(load_body(raw, self.limits.max_depth), self.limits)
        if req.model != self.name:
            raise APIError(
                404,
                f"the model {req.model!r} does not exist (served: {self.name!r})",
                param="model",
                code="model_not_found",
            )
        if self.stopping:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        prompt, images = await asyncio.to_thread(self.prepare, req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            handle = self.engine.submit(
                prompt, images, req.params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
            )
        except PromptTooLong as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from e
        except EngineBusy as e:
            raise APIError(503, f"server overloaded: {e}", "server_error", code="overloaded") from e
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        return req, prompt, handle, events

    async def sse(self, handle, events, rid, created, req: ChatRequest, usage):
        """A streamed completion's server-sent events, the slot freed when the client goes away."""

        def chunk(delta: dict, finish=None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            body = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.name,
                "choices": [choice],
                **extra,
            }
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
                body = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.name,
                    "choices": [],
                    "usage": usage(),
                }
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): free the slot
            handle.cancel()


router = APIRouter()

UNAUTHORIZED = APIError(
    401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error", code="invalid_api_key"
)


def error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found" if exc.status_code == 404 else None
    return error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind))


@router.get("/", response_class=HTMLResponse)
async def playground():
    return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))


@router.get("/playground/info")
async def playground_info(request: Request):
    """What the playground shows: the model's name and limits, and (with the key) its card."""
    srv: Server = request.app.state.server
    lim = srv.limits
    info = {
        "model": srv.name,
        "needs_key": bool(srv.api_key),
        "limits": {
            "max_image_bytes": lim.max_image_bytes,
            "max_image_pixels": lim.max_image_pixels,
            "max_images": lim.max_images,
        },
    }
    if srv.authorized(request):
        info["history"] = [{k: v for k, v in h.items() if not isinstance(v, (list, dict))} for h in srv.model.history]
        info["evals"] = srv.model.evals
    return info


@router.get("/health")
async def health(request: Request):
    srv: Server = request.app.state.server
    return {
        "status": "stopping" if srv.stopping else "ok",
        "running": len(srv.engine.running),
        "waiting": len(srv.engine.waiting),
    }


@router.get("/v1/models")
async def models(request: Request):
    srv: Server = request.app.state.server
    if not srv.authorized(request):
        return error(UNAUTHORIZED)
    return {
        "object": "list",
        "data": [{"id": srv.name, "object": "model", "created": srv.created, "owned_by": "vlmforge"}],
    }


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    srv: Server = request.app.state.server
    if not srv.authorized(request):
        return error(UNAUTHORIZED)
    try:
        req, prompt, handle, events = await srv.submit(request)
    except APIError as e:
        return error(e)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def usage() -> dict:
        return {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(handle.tokens),
            "total_tokens": len(prompt) + len(handle.tokens),
            "prompt_tokens_details": {"cached_tokens": handle.cached_tokens},
        }

    if req.stream:
        stream = srv.sse(handle, events, rid, created, req, usage)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    ev = await _finished(request, handle, events)
    if ev is None:
        return error(APIError(499, "client closed the request"))
    if ev.finish_reason == "error":
        return error(APIError(500, f"generation failed: {ev.error}", "server_error"))
    choice = {"index": 0, "message": {"role": "assistant", "content": handle.text}, "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": srv.name,
        "choices": [{**choice, "finish_reason": ev.finish_reason}],
        "usage": usage(),
    }


async def _finished(request: Request, handle, events: asyncio.Queue) -> Event | None:
    """The request's last event; None when the client went away first (its slot is then freed)."""
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), 1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    handle.cancel()
                    return None
                continue
            if ev.finish_reason is not None:
                return ev
    except asyncio.CancelledError:
        handle.cancel()
        raise
