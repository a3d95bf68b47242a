"""Frames the bridge cannot use: every failure is a FrameError with a kind and a reason."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.protocol.errors import FrameError
from bridge.protocol.messages import MAX_FRAME_BYTES, Message, Signaling, decode
from bridge.protocol.signal import Sig, decode_sig

SIG = b'{"api":"EpSignal","mt":"Signaling","call":1,"sig":'

# (id, frame, kind, text that must be in the message)
BAD_FRAMES = [
    ("not-json-word", b"hello", "not-json", "malformed"),
    ("not-json-empty", b"", "not-json", "truncated"),
    ("not-json-blank", b"   ", "not-json", "truncated"),
    ("not-json-single-quotes", b"{'mt':'Attach'}", "not-json", "malformed"),
    ("not-json-trailing-comma", b'{"mt":"Attached",}', "not-json", "malformed"),
    ("not-json-trailing-garbage", b'{"mt":"Attached"} {}', "not-json", "trailing characters"),
    ("truncated-object", b'{"mt":"Attach","hw":"0090', "not-json", "truncated"),
    ("truncated-after-key", b'{"mt":"Signaling","call":1,"sig":', "not-json", "truncated"),
    ("invalid-utf8-in-string", b'{"mt":"Attach","hw":"\xff\xfe"}', "not-json", "UTF-8"),
    ("invalid-utf8-in-mt", b'{"mt":"\xc3"}', "not-json", "UTF-8"),
    ("nan-literal", b'{"mt":"Sync","call":NaN}', "not-json", "malformed"),
    ("array", b'[{"mt":"Attached"}]', "not-object", "array"),
    ("empty-array", b"[]", "not-object", "array"),
    ("string", b'"Attached"', "not-object", "str"),
    ("number", b"42", "not-object", "int"),
    ("float", b"4.2", "not-object", "float"),
    ("null", b"null", "not-object", "null"),
    ("bool", b"true", "not-object", "bool"),
    ("unknown-mt", b'{"mt":"Foo"}', "unknown-mt", "'Foo'"),
    ("unknown-mt-case", b'{"mt":"attach","hw":"x"}', "unknown-mt", "'attach'"),
    ("unknown-mt-detach", b'{"api":"EpSignal","mt":"Detach","hw":"x"}', "unknown-mt", "'Detach'"),
    ("missing-mt", b'{"api":"EpSignal","hw":"x"}', "invalid", "`mt`"),
    ("empty-object", b"{}", "invalid", "`mt`"),
    ("mt-number", b'{"mt":7}', "invalid", "`$.mt`"),
    ("mt-null", b'{"mt":null}', "invalid", "`$.mt`"),
    ("call-as-string", b'{"api":"EpSignal","mt":"Signaling","call":"17","sig":{"type":"alert"}}',
     "invalid", "`$.call`"),
    ("call-as-float", b'{"api":"EpSignal","mt":"Signaling","call":1.5,"sig":{"type":"alert"}}',
     "invalid", "`$.call`"),
    ("call-missing", b'{"api":"EpSignal","mt":"Signaling","sig":{"type":"alert"}}',
     "invalid", "`call`"),
    ("to-as-string", b'{"api":"EpSignal","mt":"Signaling","to":"true","call":1,"sig":{"type":"alert"}}',
     "invalid", "`$.to`"),
    ("to-as-number", b'{"api":"EpSignal","mt":"Signaling","to":1,"call":1,"sig":{"type":"alert"}}',
     "invalid", "`$.to`"),
    ("hw-missing", b'{"api":"EpSignal","mt":"Attach","src":"x"}', "invalid", "`hw`"),
    ("hw-number", b'{"api":"EpSignal","mt":"Attach","hw":9033400001}', "invalid", "`$.hw`"),
    ("api-foo", b'{"api":"Foo","mt":"Attach","hw":"x"}', "invalid", "`$.api`"),
    ("api-doc-typo", b'{"api":"Api","mt":"Attach","hw":"x"}', "invalid", "`$.api`"),
    ("src-number", b'{"api":"EpSignal","mt":"Attached","src":5}', "invalid", "`$.src`"),
    ("sig-missing", b'{"api":"EpSignal","mt":"Signaling","call":1}', "invalid", "`sig`"),
    ("sig-array", SIG + b'[{"type":"alert"}]}', "invalid", "`$.sig`"),
    ("sig-string", SIG + b'"alert"}', "invalid", "`$.sig`"),
    ("sig-number", SIG + b"1}", "invalid", "`$.sig`"),
    ("sig-null", SIG + b"null}", "invalid", "`$.sig`"),
    ("sig-bool", SIG + b"false}", "invalid", "`$.sig`"),
    ("sync-info-missing", b'{"api":"EpSignal","mt":"Sync","call":1}', "invalid", "`info`"),
    ("sync-bad-state", b'{"api":"EpSignal","mt":"Sync","call":1,"info":{"state":"ringing"}}',
     "invalid", "`$.info.state`"),
    ("sync-in-as-string", b'{"api":"EpSignal","mt":"Sync","call":1,"info":{"in":"yes"}}',
     "invalid", "`$.info.in`"),
    ("sync-remote-num", b'{"api":"EpSignal","mt":"Sync","call":1,"info":{"remote":{"num":201}}}',
     "invalid", "`$.info.remote.num`"),
    ("challenge-missing", b'{"mt":"AppChallengeResult"}', "invalid", "`challenge`"),
    ("login-digest-missing", b'{"mt":"AppLogin","app":"a"}', "invalid", "`digest`"),
    ("login-ok-string", b'{"mt":"AppLoginResult","ok":"true"}', "invalid", "`$.ok`"),
    ("attach-result-turn-number", b'{"api":"EpSignal","mt":"AttachResult","turn":5}',
     "invalid", "`$.turn`"),
]


@pytest.mark.parametrize("frame, kind, text", [f[1:] for f in BAD_FRAMES],
                         ids=[f[0] for f in BAD_FRAMES])
def test_bad_frame(frame: bytes, kind: str, text: str) -> None:
    with pytest.raises(FrameError) as e:
        decode(frame)
    assert e.value.kind == kind
    assert str(e.value).startswith(kind + ":")
    assert text in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("frame, kind, text", [f[1:] for f in BAD_FRAMES if f[1].isascii()],
                         ids=[f[0] for f in BAD_FRAMES if f[1].isascii()])
def test_bad_frame_as_str(frame: bytes, kind: str, text: str) -> None:
    with pytest.raises(FrameError) as e:
        decode(frame.decode())
    assert e.value.kind == kind
    assert text in str(e.value)


def test_over_long_frame() -> None:
    pad = b" " * (MAX_FRAME_BYTES + 1 - len(b'{"mt":"Attached"}'))
    frame = b'{"mt":"Attached"}' + pad
    assert len(frame) == MAX_FRAME_BYTES + 1
    with pytest.raises(FrameError) as e:
        decode(frame)
    assert e.value.kind == "too-large"
    assert str(MAX_FRAME_BYTES + 1) in str(e.value)
    assert str(MAX_FRAME_BYTES) in str(e.value)
    # one byte less is within the limit and decodes
    assert type(decode(frame[:-1])).__name__ == "Attached"


def test_custom_limit() -> None:
    frame = b'{"api":"EpSignal","mt":"Attach","hw":"009033400001"}'
    assert decode(frame, max_bytes=len(frame)).hw == "009033400001"
    with pytest.raises(FrameError) as e:
        decode(frame, max_bytes=len(frame) - 1)
    assert e.value.kind == "too-large"
    assert f"limit of {len(frame) - 1}" in str(e.value)


def test_too_large_is_checked_before_parsing() -> None:
    # garbage that is too long is reported as too large, not as bad JSON
    with pytest.raises(FrameError) as e:
        decode(b"\xff" * 100, max_bytes=10)
    assert e.value.kind == "too-large"


def test_frame_error_kinds() -> None:
    assert set(FrameError.KINDS) == {"too-large", "not-json", "not-object", "unknown-mt", "invalid"}
    e = FrameError("invalid", "why")
    assert e.kind == "invalid" and e.detail == "why" and str(e) == "invalid: why"


# ------------------------------------------------------------------ the typed view of sig
@pytest.mark.parametrize("sig, text", [
    (b"{}", "`type`"),
    (b'{"cg":{"num":"201"}}', "`type`"),
    (b'{"type":5}', "`$.sig.type`"),
    (b'{"type":"setup","cg":201}', "`$.sig.cg`"),
    (b'{"type":"setup","cd":"201"}', "`$.sig.cd`"),
    (b'{"type":"setup","cg":{"num":201}}', "`$.sig.cg.num`"),
    (b'{"type":"rel","cau":{"num":"16"}}', "`$.sig.cau.num`"),
    (b'{"type":"rel","cau":16}', "`$.sig.cau`"),
    (b'{"type":"conn","channel":"-1"}', "`$.sig.channel`"),
    (b'{"type":"facility","fty":{"type":"hold_notify"}}', "`$.sig.fty`"),
    (b'{"type":"facility","fty":[{"name":"x"}]}', "`$.sig.fty[0]`"),
    (b'{"type":"facility","fty":[{"type":"name_identification","name":5}]}', "`$.sig.fty[0].name`"),
])
def test_signal_view_of_bad_sig(sig: bytes, text: str) -> None:
    msg = decode(SIG + sig + b"}")  # the frame itself is fine: sig is lossless bytes
    assert isinstance(msg, Signaling)
    assert bytes(msg.sig) == sig
    with pytest.raises(FrameError) as e:
        _ = msg.signal  # the view is made on access: it raises
    assert e.value.kind == "invalid"
    assert text in str(e.value), str(e.value)
    assert "`$.sig" in str(e.value), str(e.value)


def test_signal_view_missing_type_names_sig() -> None:
    msg = decode(SIG + b'{"cg":{"num":"201"}}}')
    with pytest.raises(FrameError, match=r"missing required field `type`.*`\$\.sig`"):
        _ = msg.signal  # the view is made on access: it raises


def test_signal_view_cg_number_names_sig_cg() -> None:
    msg = decode(SIG + b'{"type":"setup","cg":201}}')
    with pytest.raises(FrameError, match=r"`\$\.sig\.cg`"):
        _ = msg.signal  # the view is made on access: it raises


@pytest.mark.parametrize("raw, kind", [
    (b'{"type":"a"', "not-json"),
    (b"", "not-json"),
    (b'{"type":"\xff"}', "not-json"),
    (b"[]", "invalid"),
    (b"null", "invalid"),
])
def test_decode_sig_bad_bytes(raw: bytes, kind: str) -> None:
    with pytest.raises(FrameError) as e:
        decode_sig(raw)
    assert e.value.kind == kind
    assert "sig" in str(e.value)


# ------------------------------------------------------------------ properties: FrameError or a message
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)

VALID = [
    {"mt": "AppChallenge"},
    {"mt": "AppChallengeResult", "challenge": "609f44c1f7043ba1", "src": "s"},
    {"mt": "AppLogin", "app": "a", "domain": "", "sip": "", "guid": "", "dn": "",
     "digest": "ab", "info": {"cn": "x"}, "pbxObj": "o"},
    {"mt": "AppLoginResult", "ok": True, "error": "e"},
    {"api": "EpSignal", "mt": "Attach", "hw": "009033400001", "src": "s"},
    {"api": "EpSignal", "mt": "AttachResult", "src": "s", "err": "x", "stun": "a;b", "turn": "c",
     "turnUsr": "u", "turnPwd": "p", "prefixIntl": "000", "prefixNtl": "00", "prefixSubs": "0",
     "area": "7031", "country": "49", "maxIntern": 1, "tones": 2},
    {"api": "EpSignal", "mt": "Attached", "src": "s"},
    {"api": "EpSignal", "mt": "Detached", "src": "s"},
    {"api": "EpSignal", "mt": "Sync", "src": "s", "call": 17,
     "info": {"channel": -1, "in": True, "state": "alert", "remote": {"num": "201", "sip": "b", "dn": "B"}}},
    {"api": "EpSignal", "mt": "Signaling", "src": "s", "to": True, "call": 17,
     "sig": {"type": "setup", "cg": {"num": "201"}, "cau": {"num": 16}, "channel": 1,
             "fty": [{"type": "name_identification", "name": "Bob"}]}},
]


def decode_ok_or_frame_error(frame: bytes | str) -> Message | None:
    """decode: a message, or a FrameError, and nothing else (also for the sig view)."""
    try:
        msg = decode(frame)
    except FrameError as e:
        assert e.kind in FrameError.KINDS
        assert str(e).startswith(e.kind + ": ") and len(e.detail) > 0
        return None
    assert isinstance(msg, Message)
    if isinstance(msg, Signaling):
        assert bytes(msg.sig)[:1] == b"{"
        try:
            assert isinstance(msg.signal, Sig)
        except FrameError as e:
            assert e.kind in FrameError.KINDS
    return msg


def test_valid_frames_are_valid() -> None:
    for obj in VALID:
        msg = decode_ok_or_frame_error(json.dumps(obj).encode())
        assert msg is not None and type(msg).__name__ == obj["mt"]


@given(st.binary(max_size=300))
@settings(max_examples=400, deadline=None)
def test_arbitrary_bytes(frame: bytes) -> None:
    decode_ok_or_frame_error(frame)


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_arbitrary_text(frame: str) -> None:
    decode_ok_or_frame_error(frame)
    decode_ok_or_frame_error(frame.encode())


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_arbitrary_json_values(value: Any) -> None:
    msg = decode_ok_or_frame_error(json.dumps(value).encode())
    if not isinstance(value, dict):
        assert msg is None


@st.composite
def mutated_frames(draw: st.DrawFn) -> tuple[dict, str, Any]:
    obj = dict(draw(st.sampled_from(VALID)))
    path = draw(st.sampled_from([*sorted(obj), "<new>"]))
    value = draw(json_values)
    if path == "<new>":
        path = draw(st.text(max_size=6))
        obj[path] = value
    elif isinstance(obj[path], dict) and draw(st.booleans()):
        inner = dict(obj[path])  # replace a nested field instead
        key = draw(st.sampled_from(sorted(inner)))
        inner[key] = value
        obj[path] = inner
        path = f"{path}.{key}"
    else:
        obj[path] = value
    return obj, path, value


@given(mutated_frames())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_valid_frame_with_one_field_replaced(case: tuple[dict, str, Any]) -> None:
    obj = case[0]  # (the path and value replaced show in a failing example)
    decode_ok_or_frame_error(json.dumps(obj).encode())
    decode_ok_or_frame_error(json.dumps(obj, ensure_ascii=False))


@given(st.sampled_from(VALID), st.data())
@settings(max_examples=300, deadline=None)
def test_valid_frame_with_bytes_damaged(obj: dict, data: st.DataObject) -> None:
    frame = bytearray(json.dumps(obj).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(frame) - 1))
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if op == "flip":
            frame[i] = data.draw(st.integers(0, 255))
        elif op == "delete" and len(frame) > 1:
            del frame[i]
        else:
            frame.insert(i, data.draw(st.integers(0, 255)))
    decode_ok_or_frame_error(bytes(frame))
