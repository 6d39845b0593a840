"""Images of a request: base64 data URLs, and remote URLs only when allowed and only from public
addresses (the address checked is the one connected to; redirects are not followed)."""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
from urllib.parse import urlsplit

from vlmforge.serve.protocol import APIError, ServeLimits


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
            raise APIError(
                400,
                f"image URL host {host!r} resolves to a non-public address ({a}): refused",
                param="messages",
                code="image_url_refused",
            )
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
            raise APIError(
                400,
                f"image URL {url[:80]!r} answered HTTP {resp.status} (redirects are not followed)",
                param="messages",
            )
        data = resp.read(limits.max_image_bytes + 1)
    except (OSError, http.client.HTTPException) as e:
        raise APIError(
            400, f"image URL {url[:80]!r} cannot be fetched ({type(e).__name__}: {e})", param="messages"
        ) from e
    finally:
        conn.close()
    if len(data) > limits.max_image_bytes:
        raise too_large(f"image at {url[:80]!r} is", limits)
    return data


def too_large(what: str, limits: ServeLimits) -> APIError:
    """The 413 of an image over `--max-image-bytes`."""
    return APIError(413, f"{what} larger than {limits.max_image_bytes} bytes", param="messages", code="image_too_large")


def image_bytes(url: str, limits: ServeLimits, where: str) -> bytes:
    """The bytes of an `image_url` (a base64 data URL, or a remote URL when allowed)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            raise APIError(400, f"{where}: a data URL must be `data:image/...;base64,...`", param="messages")
        if len(payload) > limits.max_image_bytes * 4 // 3 + 8:
            raise too_large(f"{where}: image", limits)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{where}: invalid base64 image data ({e})", param="messages") from e
        if len(data) > limits.max_image_bytes:
            raise too_large(f"{where}: image", limits)
        return data
    if scheme in ("http", "https"):
        if not limits.allow_remote_images:
            raise APIError(
                400,
                f"{where}: remote image URLs are refused (start the server with --allow-remote-images)",
                param="messages",
                code="image_url_refused",
            )
        return fetch_remote(url, limits)
    if scheme == "file":
        raise APIError(400, f"{where}: file:// image URLs are refused", param="messages", code="image_url_refused")
    raise APIError(400, f"{where}: unsupported image URL scheme {scheme or url[:20]!r}", param="messages")
