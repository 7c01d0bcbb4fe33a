"""The worldloop streaming protocol, version 1: typed messages, one validating parser, the frame header.

Transport-free: nothing here knows about sockets. Every text message is a JSON object with a literal
``type``; each type is a frozen dataclass below. ``parse_client_message`` is the only way a client message
enters the server: it checks size, JSON syntax, the type, every field's type and range, and returns a typed
message or raises ``ProtocolError(code, message)``. Frames travel as binary messages: a fixed 24-byte header
(``FRAME_HEADER``) followed by JPEG or WebP bytes. ``docs/protocol.md`` is the reference, with examples.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from worldloop.models.images import MAX_PICTURE_BYTES, picture_format
from worldloop.models.keys import ALL_KEYS_MASK, parse_keys
from worldloop.models.text import MAX_PROMPT_CHARS, validate_prompt

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4096  # client text messages above this are answered with `too_large`…
# …except `start` and `reset` carrying a `first_frame` picture (base64: 4/3 of MAX_PICTURE_BYTES, plus fields)
MAX_PICTURE_MESSAGE_BYTES = 96 * 1024
U32_MAX = 2**32 - 1
MAX_FPS = 60
MAX_STEPS = 8
FRAME_MAGIC = b"WLF1"
FRAME_HEADER = struct.Struct("<4sIIHHd")  # magic, frame_seq, key_seq_applied, width, height, server_time_ms
ImageFormat = Literal["jpeg", "webp"]
StartFrom = Literal["world", "prompt"]  # a start from a picture is asked for by sending `first_frame`
SUBPROTOCOL = "worldloop.v1"  # the websocket subprotocol a server selects when the client offers it
# Browsers cannot set headers on a websocket, so they offer the access token as a second subprotocol,
# "worldloop.token.<token>", which the server checks and never selects.
TOKEN_SUBPROTOCOL_PREFIX = "worldloop.token."
# RFC 6455 §4.1: a subprotocol is an RFC 7230 token, so an access token must be one as well.
_ACCESS_TOKEN = re.compile(r"[0-9A-Za-z!#$%&'*+.^_`|~-]{8,256}")

# Every error code a server may send, with its meaning (docs/protocol.md lists the same table).
ERROR_CODES: dict[str, str] = {
    "bad_json": "not a JSON object (bad syntax, NaN/Infinity, a duplicate field, an over-long number)",
    "too_large": f"the text message is over {MAX_MESSAGE_BYTES} bytes ({MAX_PICTURE_MESSAGE_BYTES} with a "
                 "`first_frame`)",
    "binary_not_allowed": "clients send text messages only",
    "unknown_type": "the `type` field is missing or names no client message",
    "bad_field": "a field is missing, unknown, of the wrong type or out of range",
    "bad_prompt": f"the prompt is over {MAX_PROMPT_CHARS} characters or has control characters or lone "
                  "surrogates",
    "bad_keys": "a key name is unknown or a key bitmask is out of range",
    "bad_image": f"`first_frame` is not base64 of a PNG, JPEG or WebP picture of at most {MAX_PICTURE_BYTES} "
                 "bytes and 8 to 4096 pixels a side, or it cannot be decoded",
    "unsupported_protocol": "the client asked for a protocol version this server does not speak",
    "unsupported": "valid, but this server cannot do it (another `steps`; `record` without a record dir; "
                   "`start_from` \"world\" without a built-in world)",
    "no_session": "the message needs a session: send `start` first",
    "already_started": "this connection already has a session",
    "unknown_session": "the resume id is unknown or its grace period has expired",
    "unknown_snapshot": "the snapshot id is unknown or was evicted",
    "rate_limited": "too many model commands (prompt, reset, snapshot, restore, record) too fast, and this "
                    "one was dropped; or, without `request`, too many messages: the connection is read "
                    "more slowly",
    "server_full": "the server is at its session limit; the connection is then closed with code 1013",
    "internal": "the server failed to carry out a valid request",
}


class ProtocolError(Exception):
    """A message the server rejects; ``code`` is a key of ``ERROR_CODES``."""

    def __init__(self, code: str, message: str, request: str | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.request = request

    def to_message(self) -> Error:
        return Error(code=self.code, message=self.message, request=self.request)


def check_access_token(token: str) -> str:
    """Return ``token`` if it can travel as a websocket subprotocol; raise ``ValueError`` saying why not."""
    if not _ACCESS_TOKEN.fullmatch(token):
        raise ValueError("an access token must be 8 to 256 characters from A-Z a-z 0-9 and "
                         "! # $ % & ' * + - . ^ _ ` | ~ (it travels as a websocket subprotocol, which allows "
                         "only these)")
    return token


# ---- client → server ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    prompt: str
    seed: int = 0
    fps: int | None = None
    steps: int | None = None
    format: ImageFormat = "jpeg"
    quality: int = 80
    session: str | None = None  # a resume id from an earlier `ready`
    protocol: int = PROTOCOL_VERSION
    start_from: StartFrom | None = None  # None: the server's default ("world" unless it was told otherwise)
    first_frame: str | None = None  # base64 PNG/JPEG/WebP: start from this picture
    type: Literal["start"] = "start"


@dataclass(frozen=True)
class Keys:
    keys: int  # bitmask, bit i ⇔ models.keys.KEYS[i]; names are turned into a bitmask by the parser
    seq: int
    type: Literal["keys"] = "keys"


@dataclass(frozen=True)
class SetPrompt:
    prompt: str
    type: Literal["prompt"] = "prompt"


@dataclass(frozen=True)
class Reset:
    prompt: str | None = None
    seed: int | None = None
    start_from: StartFrom | None = None  # None: the way the session started
    first_frame: str | None = None  # base64 PNG/JPEG/WebP: start again from this picture
    type: Literal["reset"] = "reset"


@dataclass(frozen=True)
class TakeSnapshot:
    type: Literal["snapshot"] = "snapshot"


@dataclass(frozen=True)
class Restore:
    id: int
    type: Literal["restore"] = "restore"


@dataclass(frozen=True)
class Ack:
    frame: int
    type: Literal["ack"] = "ack"


@dataclass(frozen=True)
class Record:
    action: Literal["start", "stop"]
    type: Literal["record"] = "record"


@dataclass(frozen=True)
class StatsRequest:
    type: Literal["stats"] = "stats"


ClientMessage = Start | Keys | SetPrompt | Reset | TakeSnapshot | Restore | Ack | Record | StatsRequest

# ---- server → client ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    session: str
    model: str
    device: str
    width: int
    height: int
    fps: int
    steps: int
    format: ImageFormat
    prompt: str
    seed: int
    resumed: bool = False
    max_in_flight: int = 2
    trained: bool = True  # False: the model has random, untrained weights (its pictures are noise)
    protocol: int = PROTOCOL_VERSION
    start_from: Literal["world", "prompt", "picture"] = "prompt"  # what the stream started from
    type: Literal["ready"] = "ready"


@dataclass(frozen=True)
class Done:
    """Reply to `prompt`, `reset` and `restore`: frames with seq ≥ ``frame`` reflect the change."""

    request: Literal["prompt", "reset", "restore"]
    frame: int
    type: Literal["ok"] = "ok"


@dataclass(frozen=True)
class Snapshot:
    id: int
    frame: int  # restoring continues the stream as frame seq `frame` did
    type: Literal["snapshot"] = "snapshot"


@dataclass(frozen=True)
class Stats:
    """Counts for this session; `frames_sent`/`frames_dropped` and `in_flight` for this connection."""

    frame: int
    frames_generated: int
    frames_sent: int
    frames_dropped: int
    deadlines_missed: int
    speculative_kept: int
    speculative_discarded: int
    fps: float
    in_flight: int
    sessions: int
    type: Literal["stats"] = "stats"


@dataclass(frozen=True)
class Recording:
    state: Literal["started", "stopped"]
    name: str  # the file name under the server's record dir
    url: str  # where the finished file can be downloaded
    frames: int = 0
    type: Literal["recording"] = "recording"


@dataclass(frozen=True)
class Error:
    code: str
    message: str
    request: str | None = None
    type: Literal["error"] = "error"


@dataclass(frozen=True)
class Bye:
    reason: Literal["shutdown", "replaced", "stalled", "closed"]
    type: Literal["bye"] = "bye"


ServerMessage = Ready | Done | Snapshot | Stats | Recording | Error | Bye


def encode_message(message: ClientMessage | ServerMessage) -> str:
    """A message as compact JSON; optional fields that are None are left out."""
    fields = {k: v for k, v in dataclasses.asdict(message).items() if v is not None}
    return json.dumps(fields, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


# ---- field validators -----------------------------------------------------------------------------------

Validator = Callable[[str, Any], Any]


def _integer(lo: int, hi: int) -> Validator:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError("bad_field", f"`{name}` must be an integer")
        if not lo <= value <= hi:
            raise ProtocolError("bad_field", f"`{name}` must be in {lo}..{hi}, got {value}")
        return value
    return check


def _choice(*choices: str) -> Validator:
    def check(name: str, value: Any) -> str:
        if value not in choices or not isinstance(value, str):
            raise ProtocolError("bad_field", f"`{name}` must be one of {', '.join(map(repr, choices))}")
        return value
    return check


def _prompt(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolError("bad_field", f"`{name}` must be a string")
    try:
        return validate_prompt(value, max_chars=MAX_PROMPT_CHARS)  # the canonical form
    except ValueError as err:
        raise ProtocolError("bad_prompt", str(err)) from None


def _keys(name: str, value: Any) -> int:
    if isinstance(value, list):
        if len(value) > 16 or not all(isinstance(k, str) and k.isascii() and len(k) <= 16 for k in value):
            raise ProtocolError("bad_keys", f"`{name}` must be a list of at most 16 short key names")
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("bad_keys", f"`{name}` must be a bitmask 0..{ALL_KEYS_MASK} or a list of names")
    try:
        return parse_keys(value)
    except ValueError as err:
        raise ProtocolError("bad_keys", str(err)) from None


_DATA_URL = re.compile(r"data:image/[a-z]+;base64,")


def _picture(name: str, value: Any) -> str:
    """Base64 (optionally a ``data:image/…;base64,`` URL) of a PNG, JPEG or WebP picture; decoded, resized
    and fully checked by the server (``models.images.read_picture``)."""
    if not isinstance(value, str):
        raise ProtocolError("bad_field", f"`{name}` must be a base64 string")
    prefix = _DATA_URL.match(value[:40])
    try:
        data = base64.b64decode(value[prefix.end() if prefix else 0:], validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("bad_image", f"`{name}` is not valid base64") from None
    if len(data) > MAX_PICTURE_BYTES:
        raise ProtocolError("bad_image", f"`{name}` is {len(data)} bytes; at most {MAX_PICTURE_BYTES}")
    try:
        picture_format(data)
    except ValueError as err:
        raise ProtocolError("bad_image", f"`{name}`: {err}") from None
    return value


def picture_bytes(value: str) -> bytes:
    """The picture of a validated `first_frame` field."""
    prefix = _DATA_URL.match(value[:40])
    return base64.b64decode(value[prefix.end() if prefix else 0:])


_RESUME_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


def _resume_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _RESUME_ID.fullmatch(value):
        raise ProtocolError("bad_field", f"`{name}` must be a resume id from `ready`")
    return value


def _protocol(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_protocol", f"this server speaks protocol {PROTOCOL_VERSION} only")
    return value


_SEQ = _integer(1, U32_MAX)
# type → (class, {field: (validator, required)})
_CLIENT_SCHEMAS: dict[str, tuple[type, dict[str, tuple[Validator, bool]]]] = {
    "start": (Start, {
        "prompt": (_prompt, True), "seed": (_integer(0, U32_MAX), False),
        "fps": (_integer(1, MAX_FPS), False), "steps": (_integer(1, MAX_STEPS), False),
        "format": (_choice("jpeg", "webp"), False), "quality": (_integer(1, 100), False),
        "session": (_resume_id, False), "protocol": (_protocol, False),
        "start_from": (_choice("world", "prompt"), False), "first_frame": (_picture, False),
    }),
    "keys": (Keys, {"keys": (_keys, True), "seq": (_SEQ, True)}),
    "prompt": (SetPrompt, {"prompt": (_prompt, True)}),
    "reset": (Reset, {"prompt": (_prompt, False), "seed": (_integer(0, U32_MAX), False),
                      "start_from": (_choice("world", "prompt"), False), "first_frame": (_picture, False)}),
    "snapshot": (TakeSnapshot, {}),
    "restore": (Restore, {"id": (_integer(0, U32_MAX), True)}),
    "ack": (Ack, {"frame": (_integer(0, U32_MAX), True)}),
    "record": (Record, {"action": (_choice("start", "stop"), True)}),
    "stats": (StatsRequest, {}),
}


# ---- JSON decoding that refuses what Python's json module would accept silently -------------------------

def _reject_constant(name: str) -> Any:
    raise ProtocolError("bad_json", f"{name} is not a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError("bad_json", f"number {text[:20]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:
        raise ProtocolError("bad_json", f"integer {text[:20]}… is too long")
    return int(text)


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ProtocolError("bad_json", f"duplicate field {key[:40]!r}")
        obj[key] = value
    return obj


def _load_json(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          parse_int=_bounded_int, object_pairs_hook=_unique_object)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("bad_json", "JSON nested too deeply") from None
    except ValueError as err:  # JSONDecodeError and int-conversion limits
        raise ProtocolError("bad_json", f"invalid JSON: {err}") from None


def parse_client_message(data: str | bytes) -> ClientMessage:
    """Validate one websocket message from a client; return its typed message or raise ``ProtocolError``."""
    if not isinstance(data, str):
        raise ProtocolError("binary_not_allowed", "binary messages are not accepted; send JSON text")
    size = len(data.encode("utf-8", "surrogatepass")) if len(data) <= MAX_PICTURE_MESSAGE_BYTES else len(data)
    if size > MAX_MESSAGE_BYTES and (size > MAX_PICTURE_MESSAGE_BYTES or '"first_frame"' not in data):
        limit = f"{MAX_MESSAGE_BYTES} bytes ({MAX_PICTURE_MESSAGE_BYTES} with a `first_frame` picture)"
        raise ProtocolError("too_large", f"the message is {size} bytes; messages are limited to {limit}")
    obj = _load_json(data)
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", "a message must be a JSON object")
    if size > MAX_MESSAGE_BYTES and not (obj.get("type") in ("start", "reset") and "first_frame" in obj):
        raise ProtocolError("too_large", "messages without a `first_frame` are limited to "
                            f"{MAX_MESSAGE_BYTES} bytes")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _CLIENT_SCHEMAS:
        shown = kind[:40] if isinstance(kind, str) else kind
        known = ", ".join(_CLIENT_SCHEMAS)
        raise ProtocolError("unknown_type", f"unknown message type {shown!r}; known: {known}")
    cls, schema = _CLIENT_SCHEMAS[kind]
    try:
        unknown = [k for k in obj if k != "type" and k not in schema]
        if unknown:
            raise ProtocolError("bad_field", f"unknown field {unknown[0][:40]!r} in `{kind}`")
        values: dict[str, Any] = {}
        for name, (check, required) in schema.items():
            if name in obj:
                values[name] = check(name, obj[name])
            elif required:
                raise ProtocolError("bad_field", f"`{kind}` needs the field `{name}`")
        if "start_from" in values and "first_frame" in values:
            raise ProtocolError("bad_field", "give either `start_from` or `first_frame` (a start from that "
                                "picture), not both")
    except ProtocolError as err:
        raise ProtocolError(err.code, err.message, request=kind) from None
    return cls(**values)


_SERVER_TYPES: dict[str, type] = {
    "ready": Ready, "ok": Done, "snapshot": Snapshot, "stats": Stats, "recording": Recording,
    "error": Error, "bye": Bye,
}


def parse_server_message(text: str) -> ServerMessage:
    """Client side: a server text message as its typed message (fields are trusted, names are checked)."""
    obj = _load_json(text)
    if not isinstance(obj, dict) or obj.get("type") not in _SERVER_TYPES:
        raise ProtocolError("unknown_type", f"unexpected server message {text[:80]!r}")
    cls = _SERVER_TYPES[obj["type"]]
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in obj.items() if k in names})
    except TypeError as err:
        raise ProtocolError("bad_field", f"malformed `{obj['type']}` message: {err}") from None


# ---- binary frames --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameHeader:
    frame_seq: int
    key_seq: int  # seq of the last `keys` message applied to this frame (0: none yet)
    width: int
    height: int
    server_time_ms: float  # Unix time in ms when the frame's generation finished


def pack_frame(header: FrameHeader, payload: bytes) -> bytes:
    head = FRAME_HEADER.pack(FRAME_MAGIC, header.frame_seq & U32_MAX, header.key_seq & U32_MAX,
                             header.width, header.height, header.server_time_ms)
    return head + payload


def unpack_frame(data: bytes) -> tuple[FrameHeader, bytes]:
    """Split a binary frame message into its header and image bytes; raise ``ProtocolError`` if malformed."""
    if len(data) < FRAME_HEADER.size:
        raise ProtocolError("bad_field", f"frame message of {len(data)} bytes is shorter than its header")
    magic, seq, key_seq, width, height, t_ms = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise ProtocolError("bad_field", f"frame magic {magic!r} is not {FRAME_MAGIC!r}")
    return FrameHeader(seq, key_seq, width, height, t_ms), bytes(data[FRAME_HEADER.size:])
