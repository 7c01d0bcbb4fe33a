"""Protocol v1: parsing and validation of client messages, server message round trips, the frame header."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path

import pytest

from worldloop.models.text import MAX_PROMPT_CHARS
from worldloop.streaming.protocol import (
    ERROR_CODES,
    FRAME_HEADER,
    MAX_MESSAGE_BYTES,
    Ack,
    Bye,
    Done,
    Error,
    FrameHeader,
    Keys,
    ProtocolError,
    Ready,
    Record,
    Recording,
    Reset,
    Restore,
    SetPrompt,
    Snapshot,
    Start,
    Stats,
    StatsRequest,
    TakeSnapshot,
    encode_message,
    pack_frame,
    parse_client_message,
    parse_server_message,
    unpack_frame,
)

pytestmark = pytest.mark.timeout(30)
DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def rejects(text: str | bytes, code: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_client_message(text)
    assert caught.value.code == code, caught.value
    return caught.value


def test_every_client_message_parses_to_its_type() -> None:
    cases = {
        '{"type":"start","prompt":"a cave","seed":7,"fps":20,"steps":1,"format":"webp","quality":60,'
        '"session":"abcdefghijklmnop","protocol":1}':
            Start("a cave", 7, 20, 1, "webp", 60, "abcdefghijklmnop", 1),
        '{"type":"start","prompt":""}': Start(""),
        '{"type":"keys","keys":["w","turn_left"],"seq":3}': Keys(0b10001, 3),
        '{"type":"keys","keys":5,"seq":4294967295}': Keys(5, 2**32 - 1),
        '{"type":"keys","keys":[],"seq":1}': Keys(0, 1),
        '{"type":"prompt","prompt":"  an   ice\\tcave "}': SetPrompt("an ice cave"),
        '{"type":"reset"}': Reset(),
        '{"type":"reset","prompt":"desert","seed":0}': Reset("desert", 0),
        '{"type":"snapshot"}': TakeSnapshot(),
        '{"type":"restore","id":2}': Restore(2),
        '{"type":"ack","frame":0}': Ack(0),
        '{"type":"record","action":"stop"}': Record("stop"),
        '{"type":"stats"}': StatsRequest(),
    }
    for text, expected in cases.items():
        assert parse_client_message(text) == expected, text


@pytest.mark.parametrize("text, code", [
    ("", "bad_json"),
    ("null", "bad_json"),
    ('"start"', "bad_json"),
    ('{"type": "keys", "keys": Infinity, "seq": 1}', "bad_json"),
    ('{"type": "keys", "keys": -Infinity, "seq": 1}', "bad_json"),
    ('{"type": "ack", "frame": 1e309}', "bad_json"),
    ('{"type": "ack", "frame": ' + "9" * 4000 + "}", "bad_json"),
    ('{"type": "ack", "type": "ack", "frame": 1}', "bad_json"),
    ("[" * 1500 + "]" * 1500, "bad_json"),
    ('{"type": 5}', "unknown_type"),
    ('{"type": "ready"}', "unknown_type"),
    ('{"type": "ack", "frame": 1.0}', "bad_field"),
    ('{"type": "ack", "frame": "1"}', "bad_field"),
    ('{"type": "ack"}', "bad_field"),
    ('{"type": "start"}', "bad_field"),
    ('{"type": "start", "prompt": "x", "fps": 0}', "bad_field"),
    ('{"type": "start", "prompt": "x", "fps": 61}', "bad_field"),
    ('{"type": "start", "prompt": "x", "quality": 101}', "bad_field"),
    ('{"type": "start", "prompt": "x", "format": "png"}', "bad_field"),
    ('{"type": "start", "prompt": "x", "seed": -1}', "bad_field"),
    ('{"type": "start", "prompt": "x", "session": "../../etc"}', "bad_field"),
    ('{"type": "start", "prompt": "x", "protocol": 2}', "unsupported_protocol"),
    ('{"type": "start", "prompt": 5}', "bad_field"),
    ('{"type": "keys", "keys": 1, "seq": 0}', "bad_field"),
    ('{"type": "keys", "keys": true, "seq": 1}', "bad_keys"),
    ('{"type": "keys", "keys": "w", "seq": 1}', "bad_keys"),
    ('{"type": "keys", "keys": [1], "seq": 1}', "bad_keys"),
    ('{"type": "keys", "keys": ["\\u00e9"], "seq": 1}', "bad_keys"),
    ('{"type": "keys", "keys": -1, "seq": 1}', "bad_keys"),
    ('{"type": "prompt", "prompt": "\\udfff"}', "bad_prompt"),
    ('{"type": "prompt", "prompt": "a\\u0000b"}', "bad_prompt"),
    ('{"type": "prompt", "prompt": "a\\u001bb"}', "bad_prompt"),
    ('{"type": "record", "action": "START"}', "bad_field"),
    ('{"type": "snapshot", "id": 1}', "bad_field"),
])
def test_invalid_messages_raise_protocol_errors(text: str, code: str) -> None:
    rejects(text, code)


def test_errors_name_the_request_and_sizes_are_limited() -> None:
    assert rejects('{"type": "keys", "keys": ["jump"], "seq": 1}', "bad_keys").request == "keys"
    assert rejects("{oops", "bad_json").request is None
    assert rejects(b'{"type": "stats"}', "binary_not_allowed")
    padding = MAX_MESSAGE_BYTES - len('{"type":"prompt","prompt":""}')
    parse_client_message(json.dumps({"type": "prompt", "prompt": " " * padding}, separators=(",", ":")))
    rejects(json.dumps({"type": "prompt", "prompt": " " * (padding + 1)}, separators=(",", ":")), "too_large")
    rejects('{"type":"prompt","prompt":"' + "é" * 2100 + '"}', "too_large")  # counted in UTF-8 bytes
    rejects(json.dumps({"type": "prompt", "prompt": "x" * 301}), "bad_prompt")


def test_server_messages_round_trip() -> None:
    messages = [
        Ready("abcdefghijklmnopqrstuvwx", "tiny", "cpu", 32, 32, 30, 1, "jpeg", "a cave", 4),
        Ready("abcdefghijklmnopqrstuvwx", "tiny", "cpu", 32, 32, 30, 1, "jpeg", "a cave", 4, trained=False),
        Done("restore", 12), Snapshot(1, 30), Stats(1, 2, 3, 4, 5, 6, 7, 29.5, 1, 2),
        Recording("stopped", "worldloop-x.mp4", "/recordings/worldloop-x.mp4", 90),
        Error("bad_keys", "unknown key 'jump'", "keys"), Error("bad_json", "oops"), Bye("shutdown"),
    ]
    for message in messages:
        text = encode_message(message)
        assert json.loads(text)["type"] == message.type
        assert parse_server_message(text) == message
    assert "request" not in json.loads(encode_message(Error("bad_json", "oops")))
    assert json.loads(encode_message(messages[1]))["trained"] is False


def test_frame_header_packs_to_the_documented_layout() -> None:
    header = FrameHeader(frame_seq=42, key_seq=7, width=128, height=96, server_time_ms=1767225600123.5)
    data = pack_frame(header, b"\xff\xd8jpeg")
    assert FRAME_HEADER.size == 24 and len(data) == 24 + 6
    assert data[:24] == struct.pack("<4sIIHHd", b"WLF1", 42, 7, 128, 96, 1767225600123.5)
    assert unpack_frame(data) == (header, b"\xff\xd8jpeg")
    with pytest.raises(ProtocolError):
        unpack_frame(data[:20])
    with pytest.raises(ProtocolError):
        unpack_frame(b"XXXX" + data[4:])


def test_the_document_lists_every_error_code_and_message_type() -> None:
    doc = DOC.read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", doc, flags=re.M))
    assert set(ERROR_CODES) <= documented
    for cls in (Start, Keys, SetPrompt, Reset, TakeSnapshot, Restore, Ack, Record, StatsRequest,
                Ready, Done, Snapshot, Stats, Recording, Error, Bye):
        kind = next(f.default for f in dataclasses.fields(cls) if f.name == "type")
        assert f"`{kind}`" in doc, kind


def test_the_web_client_allows_the_same_prompt_length() -> None:
    """The page's prompt box (static HTML) holds exactly what the model and the protocol accept."""
    page = (Path(__file__).resolve().parents[1] / "app" / "web" / "index.html").read_text()
    assert 'id="prompt"' in page and f'maxlength="{MAX_PROMPT_CHARS}"' in page
