"""The request side of the API: limits, OpenAI error objects, and a chat request parsed and
checked field by field."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from vlmforge.infer.request import SamplingParams


@dataclass
class ServeLimits:
    """What one request may hold.

    Args:
        max_image_bytes: bytes of one image (decoded from base64 or downloaded).
        max_image_pixels: width x height of one image.
        max_images: images in one request.
        max_body_bytes: size of the request body.
        max_depth: nesting of objects and arrays in the body (an OpenAI request needs 5).
        default_max_tokens: max_tokens when the request gives none.
        allow_remote_images: fetch http(s) image URLs (public addresses only).
        remote_timeout: seconds for fetching one remote image.
    """

    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 40_000_000
    max_images: int = 8
    max_body_bytes: int = 64_000_000
    max_depth: int = 32
    default_max_tokens: int = 256
    allow_remote_images: bool = False
    remote_timeout: float = 10.0


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list[dict]  # vlmforge messages: role + content with <image> markers
    image_urls: list[tuple[str, str]]  # (url, where)
    params: SamplingParams
    stream: bool
    include_usage: bool
    model: str


def load_body(raw: bytes, max_depth: int):
    """The request body as JSON, or a 400 naming what is wrong: malformed text, a non-finite number
    anywhere (`NaN`, `Infinity`, which Python's parser accepts, or `1e999`), named by its path,
    nesting deeper than `max_depth`."""
    try:
        body = json.loads(raw)
    except RecursionError as e:
        raise APIError(400, f"the JSON body is nested deeper than {max_depth} levels") from e
    except ValueError as e:  # bad JSON, bad UTF-8, an integer of more digits than Python converts
        raise APIError(400, f"malformed JSON body ({e})") from e
    stack = [(body, "body", 1)]  # iterative: the depth is what is being checked
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise APIError(400, f"the JSON body is nested deeper than {max_depth} levels (at {where})")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend(
                (v, f"{where}.{k}" if isinstance(value, dict) else f"{where}[{k}]", depth + 1) for k, v in items
            )
        elif isinstance(value, float) and not math.isfinite(value):
            name = where.removeprefix("body.")
            raise APIError(400, f"`{name}` is not a finite number", param=name.split(".")[0].split("[")[0])
    return body


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
                        "<image>", ""
                    )
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
        raise APIError(
            400,
            f"{len(urls)} images in one request; at most {limits.max_images}",
            param="messages",
            code="too_many_images",
        )
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
