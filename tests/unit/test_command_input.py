"""What a command must be before the bridge carries it out (issue 13, section 4): a body of valid
UTF-8 (its ``sig`` goes to the PBX in a text frame), a valid hw id in the routing key, a valid
call id. Everything else is refused with a reason naming the problem (the consumer dead-letters
it with that reason and answers ok:false)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import ids
from bridge.commands import CommandError, SignalingCommand, parse
from bridge.routing import call_key, device_key, word

HW = "009033400001"
SIGNALING = f"device.{HW}.signaling"


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


not_utf8 = st.binary(min_size=1, max_size=12).filter(lambda b: not _utf8(b))


# ------------------------------------------------------------------------------- UTF-8
def test_the_issue_example_is_refused():
    body = b'{"call":6,"to":true,"sig":{"type":"info","dn":"\xc3"}}'
    with pytest.raises(CommandError, match=r"signaling command body is not valid UTF-8 \(byte 0xc3 at 47"):
        parse(SIGNALING, body)


@given(bad=not_utf8, where=st.sampled_from(["sig-string", "sig-key", "outside-sig", "whole"]),
       verb=st.sampled_from(["attach", "detach", "signaling"]))
@settings(max_examples=300, deadline=None)
def test_a_body_that_is_not_utf8_is_refused_naming_utf8(bad: bytes, where: str, verb: str):
    body = {
        "sig-string": b'{"call":-1,"sig":{"type":"setup","dn":"' + bad + b'"}}',
        "sig-key": b'{"call":-1,"sig":{"type":"setup","' + bad + b'":1}}',
        "outside-sig": b'{"call":-1,"x":"' + bad + b'","sig":{"type":"setup"}}',
        "whole": bad,
    }[where]
    with pytest.raises(CommandError) as e:
        parse(f"device.{HW}.{verb}", body)
    assert f"{verb} command body is not valid UTF-8" in str(e.value)


@given(text=st.text(max_size=20))
@settings(max_examples=200, deadline=None)
def test_any_utf8_text_in_a_sig_passes_byte_for_byte(text: str):
    sig = json.dumps({"type": "info", "dn": text}, ensure_ascii=False).encode()
    hw, verb, cmd = parse(SIGNALING, b'{"call":6,"to":true,"sig":' + sig + b"}")
    assert (hw, verb) == (HW, "signaling") and bytes(cmd.sig) == sig


# ------------------------------------------------------------------------------- call ids
@given(call=st.one_of(st.integers(), st.integers(-(2**31) - 2, -(2**31) + 2),
                      st.integers(2**31 - 3, 2**31 + 1), st.just(0), st.just(10**30)))
@settings(max_examples=300, deadline=None)
def test_call_ids_are_non_zero_signed_32_bit(call: int):
    body = b'{"call":%d,"sig":{"type":"setup"}}' % call
    if call != 0 and -(2**31) <= call <= 2**31 - 1:
        _, _, cmd = parse(SIGNALING, body)
        assert isinstance(cmd, SignalingCommand) and cmd.call == call and ids.valid_call(call)
    else:
        with pytest.raises(CommandError, match=r"invalid signaling command: .* - at `\$\.call`"):
            parse(SIGNALING, body)
        assert not ids.valid_call(call)


@pytest.mark.parametrize("call, reason", [
    (10**30, "Expected `int` <= 2147483647"),
    (-(2**31) - 1, "Expected `int` >= -2147483648"),
    (0, "call id 0 names no call"),
])
def test_bad_call_id_reasons(call, reason):
    with pytest.raises(CommandError, match=re.escape(reason)):
        parse(SIGNALING, b'{"call":%d,"sig":{"type":"rel"}}' % call)


# ------------------------------------------------------------------------------- hw ids
HW_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")


@pytest.mark.parametrize("key, bad", [
    ("device.*.attach", "*"),
    ("device.%2A.attach", "*"),
    ("device. .attach", " "),
    ("device.%20.detach", " "),
    ("device.%ZZ.attach", "%"),
    ("device.%25.attach", "%"),
    ("device.#.signaling", "#"),
    ("device.a%0Ab.attach", "\n"),
    ("device.%C3%BC.attach", "ü"),
    ("device.a%2Fb.attach", "/"),
    ("device." + "x" * 65 + ".attach", None),
])
def test_bad_hw_ids_are_refused_naming_the_id_and_the_rule(key, bad):
    with pytest.raises(CommandError) as e:
        parse(key, b'{"call":-1,"sig":{"type":"setup"}}' if key.endswith("signaling") else b"")
    text = str(e.value)
    assert "is not valid" in text and ids.HW_RULE in text
    if bad is not None:
        assert f"character {bad!r}" in text
    else:
        assert "it has 65 characters" in text


@pytest.mark.parametrize("hw", [HW, "00:90:33:40:00:01", "a.b", "phone-1.lobby", "user@pbx", "A_b-9",
                                "x" * 64])
def test_good_hw_ids_in_any_valid_encoding(hw):
    for key in (device_key(hw, "attach"), f"device.{hw}.attach"):  # canonical, or as typed
        if "." in hw and key == f"device.{hw}.attach":
            continue  # an unencoded dot splits the key: a bad key, not a bad hw
        assert parse(key, b"")[0] == hw


@given(hw=st.text(max_size=70))
@settings(max_examples=500, deadline=None)
def test_a_hw_id_is_accepted_exactly_when_it_matches_the_rule(hw: str):
    key = device_key(hw, "attach")
    if HW_RE.fullmatch(hw):
        assert parse(key, b"")[0] == hw and ids.valid_hw(hw) and ids.hw_error(hw) is None
    else:
        with pytest.raises(CommandError):
            parse(key, b"")
        assert not ids.valid_hw(hw) and ids.hw_error(hw) is not None


@given(hw=st.from_regex(HW_RE, fullmatch=True))
@settings(max_examples=300, deadline=None)
def test_every_key_of_a_valid_hw_fits_amqp(hw: str):
    """A routing key is at most 255 bytes: the longest one, every character encoded, fits."""
    assert len(call_key(hw, -(2**31), "signaling").encode()) <= 255
    assert len(device_key(hw, "attach", "failed")) <= 255
    assert len(word(hw)) <= 3 * ids.HW_MAX_LENGTH


def test_check_devices_for_epsignal_devices():
    ids.check_devices([HW, "00:90:33:40:00:02"])
    with pytest.raises(ValueError, match=r"EPSIGNAL_DEVICES: hw id '\*' is not valid .*; hw id 'a b'"):
        ids.check_devices([HW, "*", "a b"])


def test_intercept_commands_are_parsed_strictly():
    hw, verb, cmd = parse("device.dev1.intercept", b'{"rules":[{"type":"setup","to":true,"fail":"closed"}]}')
    assert (hw, verb, cmd.rules[0].type, cmd.rules[0].fail) == ("dev1", "intercept", "setup", "closed")
    for body, why in [(b"", "not JSON"), (b'{"rules":[{"type":"setup","to":true,"deadline_ms":1}]}',
                                          "$.rules[0].deadline_ms"),
                      (b'{"rules":[],"v":2}', "unsupported schema version")]:
        with pytest.raises(CommandError, match=re.escape(why)):
            parse("device.dev1.intercept", body)
