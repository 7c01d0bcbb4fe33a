"""The plain-HTTP side of the server: access policy (Host, Origin, token) and the non-websocket routes.

Pure functions over the request's headers and paths; ``streaming.server`` calls them from the websocket
handshake hook. Routes: the web client's static files, ``/healthz``, ``/metrics`` and ``/recordings/<name>``;
``/ws`` takes GET only, every other route GET and HEAD (405 with ``Allow`` otherwise).
"""

from __future__ import annotations

import dataclasses
import email.utils
import hmac
import html
import ipaddress
import json
import math
import mimetypes
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote, urlsplit

from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeader
from websockets.headers import parse_subprotocol
from websockets.http11 import Response

from worldloop.streaming.protocol import TOKEN_SUBPROTOCOL_PREFIX
from worldloop.streaming.recording import is_recording_name

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_DOWNLOAD_BYTES = 512 * 2**20


@dataclass(frozen=True)
class AccessPolicy:
    """Who may use the server. See docs/protocol.md, "Security"."""

    host: str  # the address the server is bound to
    port: int
    allowed_origins: frozenset[str] = frozenset()  # exact origins, or "*" for any
    token: str | None = None

    def host_allowed(self, host_header: str | None) -> bool:
        """Refuse Host names we do not answer to (defeats DNS rebinding to a local server)."""
        if not host_header:
            return False
        name = _hostname(host_header)
        if name is None:
            return False
        if name in LOCAL_HOSTS or name == self.host or _is_ip(name):
            return True
        extra = {_hostname(_netloc(o)) for o in self.allowed_origins if o != "*"}
        return name in extra or "*" in self.allowed_origins

    def origin_allowed(self, origin: str | None, host_header: str | None) -> bool:
        """Browsers always send Origin; programs may leave it out."""
        if origin is None:
            return True
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        try:
            parts = urlsplit(origin)
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError:  # e.g. "http://[": not an origin at all
            return False
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False
        if parts.netloc == host_header:  # same origin as the page this server served
            return True
        return _hostname(parts.netloc) in LOCAL_HOSTS

    def token_ok(self, authorization: str | None, subprotocols: Iterable[str] = ()) -> bool:
        """The token as ``Authorization: Bearer <token>`` (programs) or, on the websocket only, as the
        offered subprotocol ``worldloop.token.<token>`` (browsers). Compared in constant time."""
        if self.token is None:
            return True
        by_header = authorization is not None and hmac.compare_digest(
            authorization.encode(), f"Bearer {self.token}".encode())
        offered = [p.removeprefix(TOKEN_SUBPROTOCOL_PREFIX) for p in subprotocols
                   if p.startswith(TOKEN_SUBPROTOCOL_PREFIX)]
        # One guess per request: offering several tokens at once is refused.
        by_subprotocol = len(offered) == 1 and hmac.compare_digest(offered[0].encode(), self.token.encode())
        return by_header or by_subprotocol


def offered_subprotocols(headers: Headers) -> list[str]:
    """The subprotocols a websocket request offers (none when the header is malformed)."""
    try:
        return [p for value in headers.get_all("Sec-WebSocket-Protocol") for p in parse_subprotocol(value)]
    except InvalidHeader:
        return []


def _netloc(url: str) -> str:
    try:
        return urlsplit(url).netloc
    except ValueError:
        return ""


def _hostname(netloc: str) -> str | None:
    try:
        return urlsplit(f"//{netloc}").hostname
    except ValueError:
        return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def response(status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8",
             extra: Iterable[tuple[str, str]] = ()) -> Response:
    data = body.encode() if isinstance(body, str) else body
    status_ = HTTPStatus(status)
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Content-Type", content_type),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Connection", "close"),
        *extra,
    ])
    return Response(status_.value, status_.phrase, headers, data)


def json_response(status: int, payload: dict[str, object]) -> Response:
    return response(status, json.dumps(payload, sort_keys=True), "application/json")


def error_response(status: int, message: str) -> Response:
    return response(status, message + "\n")


def method_not_allowed(allow: str) -> Response:
    return response(405, f"method not allowed here; allowed: {allow}\n", extra=[("Allow", allow)])


def too_many_requests(retry_after_s: float, message: str) -> Response:
    seconds = max(1, math.ceil(retry_after_s))
    return response(429, f"{message}; try again in {seconds} s\n", extra=[("Retry-After", str(seconds))])


def head_only(answer: Response) -> Response:
    """The answer to HEAD: the GET answer's status and headers (Content-Length included), no body."""
    return dataclasses.replace(answer, body=b"")


def unauthorized() -> Response:
    return response(401, "an access token is required: the header 'Authorization: Bearer <token>', or on the "
                         "websocket the subprotocol 'worldloop.token.<token>' next to 'worldloop.v1'\n",
                    extra=[("WWW-Authenticate", 'Bearer realm="worldloop"')])


def static_path(web_dir: Path, url_path: str) -> Path | None:
    """The file under ``web_dir`` for a URL path, or None if the path is not a plain file inside it."""
    path = unquote(urlsplit(url_path).path)
    if path.endswith("/"):
        path += "index.html"
    parts = path.split("/")[1:]
    if any(p in ("", ".", "..") or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
        return None
    root = web_dir.resolve()
    candidate = root.joinpath(*parts).resolve()
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate


def file_response(path: Path, download_name: str | None = None, head: bool = False) -> Response:
    """A file as a 200 answer; ``head``: its headers only (the file is not read)."""
    size = path.stat().st_size
    if size > MAX_DOWNLOAD_BYTES:
        return error_response(413, f"{path.name} is too large to serve")
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type in ("application/javascript", "application/json"):
        content_type += "; charset=utf-8"
    extra = [("Content-Disposition", f'attachment; filename="{download_name}"')] if download_name else []
    if head:
        answer = response(200, b"", content_type, extra)
        del answer.headers["Content-Length"]
        answer.headers["Content-Length"] = str(size)
        return answer
    return response(200, path.read_bytes(), content_type, extra)


def recording_file(record_dir: Path | None, url_path: str, active: set[str]) -> Path | None:
    """A finished recording for ``/recordings/<name>``; None unless the name is one we create."""
    name = unquote(urlsplit(url_path).path).removeprefix("/recordings/")
    if record_dir is None or not is_recording_name(name) or name in active:
        return None
    path = record_dir / name
    return path if path.is_file() else None


def fallback_page(web_dir: Path | None) -> str:
    where = f" (looked in {html.escape(str(web_dir))})" if web_dir is not None else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>worldloop server</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>worldloop server</h1>
<p>The browser client is not installed with this server{where}, so there is nothing to play here.</p>
<p>The server itself is running: programs connect to the websocket at <code>/ws</code>
(protocol in <code>docs/protocol.md</code>, Python client in <code>streaming/client.py</code>);
health is at <a href="/healthz">/healthz</a> and metrics at <code>/metrics</code>.</p>
</body></html>
"""
