"""Frame codec: every message type from realistic frames, round trips, losslessness of ``sig``."""

from __future__ import annotations

import json
import string
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec import UNSET

from bridge.protocol.messages import (
    AppChallenge,
    AppChallengeResult,
    AppLogin,
    AppLoginResult,
    Attach,
    Attached,
    AttachResult,
    CallState,
    Detached,
    Info,
    Remote,
    Signaling,
    Sync,
    decode,
    encode,
)
from bridge.protocol.signal import Cause, Facility, Party, Sig

# ------------------------------------------------------------------ EPSIGNAL.md section 2, byte for byte
DOC_ATTACH = b'{"api":"EpSignal","mt":"Attach","hw":"009033400001","src":"..."}'
DOC_ATTACH_RESULT = (
    b'{"api":"EpSignal","mt":"AttachResult","src":"...","err":"...","stun":"a;b","turn":"c;d",'
    b'"turnUsr":"u","turnPwd":"p",\n "prefixIntl":"000","prefixNtl":"00","prefixSubs":"0",'
    b'"area":"7031","country":"49"}'
)
DOC_ATTACHED = b'{"api":"EpSignal","mt":"Attached","src":"..."}'
DOC_DETACHED = b'{"api":"EpSignal","mt":"Detached","src":"..."}'
DOC_SYNC = (
    b'{"api":"EpSignal","mt":"Sync","src":"...","call":17,"info":{"channel":-1,"in":true,'
    b'"state":"alert","remote":{"num":"201","sip":"bob","dn":"Bob"}}}'
)
DOC_SIGNALING = b'{"api":"EpSignal","mt":"Signaling","src":"...","to":true,"call":17,"sig":{"type":"alert"}}'
# section 1
DOC_CHALLENGE = b'{"mt":"AppChallenge"}'
DOC_CHALLENGE_RESULT = b'{"mt":"AppChallengeResult","challenge":"609f44c1f7043ba1"}'
DOC_LOGIN = (
    b'{"mt":"AppLogin","app":"epsignal","domain":"","sip":"","guid":"","dn":"",'
    b'"digest":"a205299ed2ef2786c311e0be1b14db343f2cadd906a6ae7b564eee34bda5e9a1",'
    b'"info":{"cn":"Bridge"},"pbxObj":"epsignal"}'
)
DOC_LOGIN_RESULT = b'{"mt":"AppLoginResult","ok":true}'


def roundtrip(msg: Any) -> Any:
    again = decode(encode(msg))
    assert type(again) is type(msg)
    assert again == msg
    return again


def test_doc_attach() -> None:
    msg = decode(DOC_ATTACH)
    assert type(msg) is Attach
    assert (msg.api, msg.hw, msg.src) == ("EpSignal", "009033400001", "...")
    roundtrip(msg)
    assert json.loads(encode(msg)) == json.loads(DOC_ATTACH)


def test_doc_attach_result() -> None:
    msg = decode(DOC_ATTACH_RESULT)
    assert type(msg) is AttachResult
    assert msg.src == "..."
    assert msg.err == "..."
    assert msg.failed is True
    assert (msg.stun, msg.turn, msg.turnUsr, msg.turnPwd) == ("a;b", "c;d", "u", "p")
    assert (msg.prefixIntl, msg.prefixNtl, msg.prefixSubs) == ("000", "00", "0")
    assert (msg.area, msg.country) == ("7031", "49")
    assert msg.maxIntern is UNSET and msg.tones is UNSET
    roundtrip(msg)
    assert json.loads(encode(msg)) == json.loads(DOC_ATTACH_RESULT)


def test_doc_attached_detached() -> None:
    for frame, cls in [(DOC_ATTACHED, Attached), (DOC_DETACHED, Detached)]:
        msg = decode(frame)
        assert type(msg) is cls
        assert msg.src == "..." and msg.api == "EpSignal"
        roundtrip(msg)
        assert json.loads(encode(msg)) == json.loads(frame)


def test_doc_sync() -> None:
    msg = decode(DOC_SYNC)
    assert type(msg) is Sync
    assert msg.src == "..."
    assert msg.call == 17
    assert msg.info.channel == -1
    assert msg.info.in_ is True
    assert msg.info.state is CallState.ALERT
    assert msg.info.remote == Remote(num="201", sip="bob", dn="Bob")
    roundtrip(msg)
    assert json.loads(encode(msg)) == json.loads(DOC_SYNC)


@pytest.mark.parametrize("state", [s.value for s in CallState if s is not CallState.RELEASED])
def test_sync_every_documented_state(state: str) -> None:
    frame = b'{"api":"EpSignal","mt":"Sync","call":3,"info":{"state":"' + state.encode() + b'"}}'
    msg = decode(frame)
    assert type(msg) is Sync
    assert msg.info.state == CallState(state)
    assert msg.info.in_ is UNSET and msg.info.remote is UNSET and msg.info.channel is UNSET
    roundtrip(msg)


def test_sync_state_null_and_partial_remote() -> None:
    msg = decode(b'{"api":"EpSignal","mt":"Sync","call":-4,"info":{"channel":0,"in":false,'
                 b'"state":null,"remote":{"num":"S0711"}}}')
    assert type(msg) is Sync
    assert msg.call == -4
    assert msg.info.state is None
    assert msg.info.in_ is False
    assert msg.info.channel == 0
    assert msg.info.remote == Remote(num="S0711")
    assert msg.info.remote.sip is None and msg.info.remote.dn is None
    roundtrip(msg)


def test_doc_signaling() -> None:
    msg = decode(DOC_SIGNALING)
    assert type(msg) is Signaling
    assert msg.src == "..."
    assert msg.call == 17
    assert msg.to is True
    assert bytes(msg.sig) == b'{"type":"alert"}'
    assert msg.signal.type == "alert"
    roundtrip(msg)
    assert json.loads(encode(msg)) == json.loads(DOC_SIGNALING)


@pytest.mark.parametrize("to, toward", [(b'', False), (b'"to":false,', False), (b'"to":true,', True)])
def test_signaling_direction(to: bytes, toward: bool) -> None:
    frame = b'{"api":"EpSignal","mt":"Signaling",' + to + b'"call":-2,"sig":{"type":"conn"}}'
    msg = decode(frame)
    assert type(msg) is Signaling
    assert (msg.to is True) is toward
    assert msg.call == -2
    again = roundtrip(msg)
    # forwarding: the message goes back with the same direction and call
    assert json.loads(encode(again)) == json.loads(frame)


def test_signaling_encode_ignores_cached_view() -> None:
    msg = decode(DOC_SIGNALING)
    before = encode(msg)
    assert msg.signal.type == "alert"  # fills the cache
    assert msg.signal is msg.signal  # decoded once
    assert encode(msg) == before


def test_signaling_built_by_hand() -> None:
    sig = msgspec.Raw(b'{"type":"setup","cd":{"num":"201"}}')
    msg = Signaling(call=-1, sig=sig, src="cmd-1")
    frame = encode(msg)
    assert json.loads(frame) == {"mt": "Signaling", "src": "cmd-1", "api": "EpSignal", "call": -1,
                                 "sig": {"type": "setup", "cd": {"num": "201"}}}
    assert "to" not in json.loads(frame)
    assert msg.to is not True
    assert roundtrip(msg).signal.cd == Party(num="201")


def test_doc_login_frames() -> None:
    c = decode(DOC_CHALLENGE)
    assert type(c) is AppChallenge and c.src is UNSET
    roundtrip(c)
    cr = decode(DOC_CHALLENGE_RESULT)
    assert type(cr) is AppChallengeResult and cr.challenge == "609f44c1f7043ba1"
    roundtrip(cr)
    lg = decode(DOC_LOGIN)
    assert type(lg) is AppLogin
    assert lg.app == "epsignal" and lg.domain == lg.sip == lg.guid == lg.dn == ""
    assert lg.digest.startswith("a205299e")
    assert bytes(lg.info) == b'{"cn":"Bridge"}'
    assert lg.pbxObj == "epsignal"
    roundtrip(lg)
    assert json.loads(encode(lg)) == json.loads(DOC_LOGIN)
    lr = decode(DOC_LOGIN_RESULT)
    assert type(lr) is AppLoginResult and lr.ok is True and lr.error is UNSET
    roundtrip(lr)


def test_login_defaults_for_absent_fields() -> None:
    lg = decode(b'{"mt":"AppLogin","app":"x","digest":"d"}')
    assert type(lg) is AppLogin
    assert (lg.domain, lg.sip, lg.guid, lg.dn) == ("", "", "", "")
    assert lg.info is UNSET and lg.pbxObj is UNSET
    lr = decode(b'{"mt":"AppLoginResult","ok":false,"error":"no"}')
    assert type(lr) is AppLoginResult and lr.ok is False and lr.error == "no"


# every message type, each with a src: decoded to its class with src, and round-tripped
ALL_FRAMES = {
    AppChallenge: b'{"mt":"AppChallenge","src":"S"}',
    AppChallengeResult: b'{"mt":"AppChallengeResult","challenge":"0123","src":"S"}',
    AppLogin: b'{"mt":"AppLogin","app":"a","digest":"00","src":"S"}',
    AppLoginResult: b'{"mt":"AppLoginResult","ok":true,"src":"S"}',
    Attach: b'{"api":"EpSignal","mt":"Attach","hw":"h","src":"S"}',
    AttachResult: b'{"api":"EpSignal","mt":"AttachResult","src":"S"}',
    Attached: b'{"api":"EpSignal","mt":"Attached","src":"S"}',
    Detached: b'{"api":"EpSignal","mt":"Detached","src":"S"}',
    Sync: b'{"api":"EpSignal","mt":"Sync","call":1,"info":{},"src":"S"}',
    Signaling: b'{"api":"EpSignal","mt":"Signaling","call":1,"sig":{"type":"rel"},"src":"S"}',
}


@pytest.mark.parametrize("cls", list(ALL_FRAMES), ids=lambda c: c.__name__)
def test_src_carried_on_every_type(cls: type) -> None:
    msg = decode(ALL_FRAMES[cls])
    assert type(msg) is cls
    assert msg.src == "S"
    again = roundtrip(msg)
    assert again.src == "S"
    assert json.loads(encode(msg))["src"] == "S"
    assert json.loads(encode(msg))["mt"] == cls.__name__


@pytest.mark.parametrize("cls", list(ALL_FRAMES), ids=lambda c: c.__name__)
def test_decode_accepts_str_frames(cls: type) -> None:
    assert decode(ALL_FRAMES[cls].decode()) == decode(ALL_FRAMES[cls])


@pytest.mark.parametrize("cls", [c for c in ALL_FRAMES if c.__name__ not in
                                 ("AppChallenge", "AppChallengeResult", "AppLogin", "AppLoginResult")],
                         ids=lambda c: c.__name__)
def test_epsignal_types_default_api(cls: type) -> None:
    # api is optional on receive (the login messages have none) and always sent
    frame = ALL_FRAMES[cls].replace(b'"api":"EpSignal",', b"")
    msg = decode(frame)
    assert type(msg) is cls and msg.api == "EpSignal"
    assert json.loads(encode(msg))["api"] == "EpSignal"


def test_unset_fields_are_not_sent() -> None:
    assert json.loads(encode(Attach(hw="x"))) == {"mt": "Attach", "api": "EpSignal", "hw": "x"}
    assert json.loads(encode(AttachResult())) == {"mt": "AttachResult", "api": "EpSignal"}
    assert json.loads(encode(AppChallenge())) == {"mt": "AppChallenge"}
    sync = Sync(call=1, info=Info(state=CallState.SETUP))
    assert json.loads(encode(sync))["info"] == {"state": "setup"}


# ------------------------------------------------------------------ AttachResult
FULL_ATTACH_RESULT = (
    b'{"api":"EpSignal","mt":"AttachResult","src":"a1","stun":"stun1.example:3478;stun2.example",'
    b'"turn":"turn1.example:3478;turn2.example","turnUsr":"bridge","turnPwd":"TURN-SECRET-xyz",'
    b'"prefixIntl":"000","prefixNtl":"00","prefixSubs":"0","area":"7031","country":"49",'
    b'"maxIntern":5,"tones":2,"someFutureField":{"nested":[1,2,{"x":null}]},"another":1.5}'
)


def test_attach_result_every_field_and_unknown_extra() -> None:
    msg = decode(FULL_ATTACH_RESULT)
    assert type(msg) is AttachResult
    assert msg.failed is False
    assert msg.err is UNSET
    assert msg.src == "a1"
    assert msg.stun.split(";") == ["stun1.example:3478", "stun2.example"]
    assert msg.turn.split(";") == ["turn1.example:3478", "turn2.example"]
    assert msg.turnUsr == "bridge" and msg.turnPwd == "TURN-SECRET-xyz"
    assert (msg.prefixIntl, msg.prefixNtl, msg.prefixSubs, msg.area, msg.country) == (
        "000", "00", "0", "7031", "49")
    assert msg.maxIntern == 5 and msg.tones == 2
    again = roundtrip(msg)
    assert again.maxIntern == 5 and again.tones == 2


ERR_VALUES = ['"unknown device"', '""', "0", "1", "-3", "1.5", "true", "false", "null", "[]",
              '[1,"x"]', "{}", '{"code":404,"text":"no such hw"}']


@pytest.mark.parametrize("err", ERR_VALUES)
def test_err_of_any_json_type_marks_failed(err: str) -> None:
    frame = b'{"api":"EpSignal","mt":"AttachResult","src":"x","err":' + err.encode() + b"}"
    msg = decode(frame)
    assert type(msg) is AttachResult
    assert msg.failed is True
    assert msg.err == json.loads(err)
    again = roundtrip(msg)
    assert again.failed is True


def test_attach_result_repr_hides_turn_password() -> None:
    msg = decode(FULL_ATTACH_RESULT)
    for text in (repr(msg), str(msg), f"{msg}", f"{msg!r}", repr([msg]), repr({"m": msg})):
        assert "TURN-SECRET-xyz" not in text
        assert "turnPwd='***'" in text or "turnPwd=***" in text or "***" in text
    # the other fields stay visible
    assert "turnUsr='bridge'" in repr(msg)
    assert "maxIntern=5" in repr(msg)
    # and the value itself is intact for the code that needs it
    assert msg.turnPwd == "TURN-SECRET-xyz"


@given(secret=st.text(alphabet=string.ascii_letters + string.digits + "!$%&/()=?", min_size=6))
@settings(max_examples=100, deadline=None)
def test_attach_result_repr_never_contains_secret(secret: str) -> None:
    secret = "pw" + secret
    msg = AttachResult(turnPwd=secret, turnUsr="u", stun="s", err="e")
    assert secret not in repr(msg)
    assert secret not in str(msg)


def test_attach_result_repr_without_password() -> None:
    text = repr(AttachResult(turnUsr="u"))
    assert text.startswith("AttachResult(")
    assert "***" not in text
    assert "turnUsr='u'" in text


# ------------------------------------------------------------------ losslessness of sig
SIG_TYPES = ["setup", "setup_ack", "call_proc", "alert", "conn", "disc", "rel", "info",
             "progress", "accept", "channels", "facility", "user_info", "media_info"]
FTY_TYPES = ["name_identification", "hold_notify", "retrieve_notify", "ct_initiate", "cp_park",
             "presence_notify", "im_setup"]

# arbitrary JSON: unicode, big ints, floats, null, bools, nested containers
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: beyond int64 too
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def extras(reserved: set[str]) -> st.SearchStrategy[dict]:
    """Unknown keys (never one of the reserved, typed ones) with arbitrary JSON values."""
    return st.dictionaries(st.text(max_size=10).filter(lambda k: k not in reserved), json_values,
                           max_size=3)


party = st.builds(
    lambda num, sip, more: {**({"num": num} if num is not None else {}),
                            **({"sip": sip} if sip is not None else {}), **more},
    st.none() | st.from_regex(r"[RSNI]?[0-9*#]{0,12}", fullmatch=True),
    st.none() | st.text(max_size=12),
    extras({"num", "sip"}),
)
cause = st.builds(
    lambda loc, num, more: {**({"loc": loc} if loc is not None else {}),
                            **({"num": num} if num is not None else {}), **more},
    st.none() | json_values,
    st.none() | st.integers(min_value=0, max_value=127),
    extras({"loc", "num"}),
)


def _fty(kind: str, name: str | None, body: dict) -> dict:
    out = {"type": kind, **body}
    if name is not None:
        out["name"] = name
    return out


facility = st.one_of(
    st.builds(_fty, st.just("name_identification"), st.text(max_size=20),
              extras({"type", "name"})),
    st.builds(_fty, st.sampled_from(["hold_notify", "retrieve_notify", "cp_park", "presence_notify"]),
              st.none(), extras({"type", "name"})),
    st.builds(  # ct_initiate with nested objects
        lambda cd, rr, more: {"type": "ct_initiate", "cd": cd, "rerouting": rr, **more},
        party, st.dictionaries(st.text(max_size=5), json_values, max_size=3),
        extras({"type", "name", "cd", "rerouting"}),
    ),
    st.builds(_fty, st.just("im_setup"), st.none(),
              st.fixed_dictionaries({"msg": st.text(), "ids": st.lists(st.integers(), max_size=3)})),
)
channels = st.fixed_dictionaries(
    {"source": st.sampled_from(["local", "remote"]),
     "ch": st.lists(st.fixed_dictionaries(
         {"coder": st.sampled_from(["G711A", "G711U", "G722", "OPUS-WB"]),
          "addr": st.ip_addresses().map(str), "port": st.integers(0, 65535)},
         optional={"number": st.integers(0, 127), "ice": st.lists(json_values, max_size=2),
                   "keys": st.lists(st.lists(st.text(max_size=6), max_size=2), max_size=2)}),
         max_size=3)},
    optional={"ice": st.dictionaries(st.text(max_size=5), json_values, max_size=2)},
)

KNOWN = {"type", "cg", "cd", "cau", "channel", "fty"}


@st.composite
def sig_objects(draw: st.DrawFn) -> dict:
    fields: dict[str, Any] = {"type": draw(st.sampled_from(SIG_TYPES))}
    optional = {
        "cg": party, "cd": party, "cau": cause, "channel": st.integers(-1, 3),
        "fty": st.lists(facility, max_size=4), "channels": channels,
        "bc": st.sampled_from(["a880", "8090a2"]), "complete": st.booleans(),
        "inband_info": st.booleans(), "dsp": st.text(max_size=10),
        "uui": st.text(max_size=10), "pi": st.integers(0, 8),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        fields[key] = draw(optional[key])
    fields.update(draw(extras(KNOWN | set(optional))))
    # any key order, "type" need not be first
    order = draw(st.permutations(list(fields)))
    return {k: fields[k] for k in order}


json_styles = st.sampled_from([
    dict(separators=(",", ":"), ensure_ascii=False),
    dict(separators=(",", ":"), ensure_ascii=True),
    dict(separators=(", ", ": "), ensure_ascii=False),
    dict(indent=1, ensure_ascii=False),
])


def expected_name(sig: dict) -> str | None:
    for f in sig.get("fty", []):
        if f["type"] == "name_identification" and "name" in f:
            return f["name"]
    return None


def assert_party(view: Party | Any, gen: dict | None) -> None:
    if gen is None:
        assert view is UNSET
        return
    assert view.num == gen.get("num", UNSET)
    assert view.sip == gen.get("sip", UNSET)


@given(sig=sig_objects(), style=json_styles, call=st.integers(-(2**31), 2**31),
       to=st.sampled_from([None, True, False]), src=st.none() | st.text(max_size=10))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_signaling_is_lossless(sig: dict, style: dict, call: int, to: bool | None,
                               src: str | None) -> None:
    sig_bytes = json.dumps(sig, **style).encode()
    frame_obj: dict[str, Any] = {"api": "EpSignal", "mt": "Signaling", "call": call}
    if to is not None:
        frame_obj["to"] = to
    if src is not None:
        frame_obj["src"] = src
    head = json.dumps(frame_obj, ensure_ascii=False)[:-1].encode()
    frame = head + b',"sig":' + sig_bytes + b"}"
    original = json.loads(frame)
    assert original["sig"] == sig  # the generator and stdlib agree

    msg = decode(frame)
    assert type(msg) is Signaling
    assert bytes(msg.sig) == sig_bytes  # byte for byte
    assert msg.call == call
    assert (msg.to is True) is (to is True)
    assert msg.src == (src if src is not None else UNSET)

    out = encode(msg)
    assert json.loads(out) == original
    assert sig_bytes in out  # the sig is forwarded verbatim, not re-serialised
    assert bytes(decode(out).sig) == sig_bytes

    view = msg.signal
    assert isinstance(view, Sig)
    assert view.type == sig["type"]
    assert_party(view.cg, sig.get("cg"))
    assert_party(view.cd, sig.get("cd"))
    if "cau" in sig:
        assert isinstance(view.cau, Cause)
        assert view.cau.num == sig["cau"].get("num")
        assert view.cau.loc == sig["cau"].get("loc")
    else:
        assert view.cau is UNSET
    assert view.channel == sig.get("channel", UNSET)
    assert view.display_name() == expected_name(sig)
    if "fty" in sig:
        assert [f.type for f in view.facilities()] == [f["type"] for f in sig["fty"]]
        assert all(isinstance(f, Facility) for f in view.facilities())
    else:
        assert view.facilities() == []
    # reading the view changes nothing on the wire
    assert encode(msg) == out


def test_sig_with_unknown_fields_byte_exact_example() -> None:
    sig = ('{"type":"setup","bc":"8090a2","cg":{"num":"201","sip":"bob","x-ext":[1,{"y":null}]},'
           '"cd":{"num":"S0711","sip":"carol"},"complete":true,"channel":-1,'
           '"fty":[{"type":"name_identification","name":"Bob Müller","pres":"allowed"},'
           '{"type":"ct_initiate","cd":{"num":"202"},"inner":{"deep":{"deeper":[[]]}}}],'
           '"channels":{"source":"local","ch":[{"coder":"G722","addr":"10.0.0.1","port":5004}]},'
           '"big":123456789012345678901234567890,"f":1.0e-7,"u":"\\u00fc\\ud83d\\ude00","n":null}')
    frame = ('{"mt":"Signaling","api":"EpSignal","call":9,"sig":' + sig + "}").encode()
    msg = decode(frame)
    assert bytes(msg.sig) == sig.encode()
    assert encode(msg) == frame
    view = msg.signal
    assert view.type == "setup"
    assert view.cg == Party(num="201", sip="bob")
    assert view.cd == Party(num="S0711", sip="carol")
    assert view.channel == -1
    assert view.display_name() == "Bob Müller"
    assert json.loads(bytes(msg.sig))["big"] == 123456789012345678901234567890
