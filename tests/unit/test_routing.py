"""Routing-key words and keys: percent-encoding, fixed word counts, command keys."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.routing import call_key, commands_of, device_key, gap_key, parse_command_key, unword, word

WORD = re.compile(r"[A-Za-z0-9_%-]+")
ids = st.text(min_size=1, max_size=40)


@given(ids)
@settings(max_examples=500, deadline=None)
def test_word_unword_inverse(text: str) -> None:
    w = word(text)
    assert unword(w) == text
    assert WORD.fullmatch(w), w
    assert "." not in w and "*" not in w and "#" not in w and " " not in w


@given(st.integers())
@settings(max_examples=100, deadline=None)
def test_word_of_int(n: int) -> None:
    w = word(n)
    assert w == str(n)
    assert unword(w) == str(n)


@given(st.from_regex(r"[A-Za-z0-9_-]+", fullmatch=True))
@settings(max_examples=100, deadline=None)
def test_safe_words_are_unchanged(text: str) -> None:
    assert word(text) == text


@given(ids)
@settings(max_examples=200, deadline=None)
def test_word_is_injective_and_canonical(text: str) -> None:
    # upper-case hex, every escape is exactly %XX
    w = word(text)
    assert re.fullmatch(r"(?:[A-Za-z0-9_-]|%[0-9A-F]{2})+", w), w
    assert word(unword(w)) == w


@pytest.mark.parametrize("text, expected", [
    ("009033400001", "009033400001"),
    ("00:90:33", "00%3A90%3A33"),
    ("a.b", "a%2Eb"),
    (".", "%2E"),
    ("*", "%2A"),
    ("#", "%23"),
    ("a b", "a%20b"),
    ("%", "%25"),
    ("%2E", "%252E"),
    ("ü", "%C3%BC"),
    ("☎", "%E2%98%8E"),
    ("under_score-dash", "under_score-dash"),
    ("+", "%2B"),
    ("/", "%2F"),
])
def test_word_examples(text: str, expected: str) -> None:
    assert word(text) == expected
    assert unword(expected) == text


def test_dot_becomes_percent_2e() -> None:
    assert word("device.1") == "device%2E1"
    assert "." not in word("...")
    assert word("...") == "%2E%2E%2E"


@given(hw=ids, call=st.integers(-(2**31), 2**31),
       kind=st.sampled_from(["state", "signaling"]))
@settings(max_examples=300, deadline=None)
def test_keys_have_a_fixed_word_count(hw: str, call: int, kind: str) -> None:
    for suffix in (("attached",), ("detached",), ("attach", "failed")):
        key = device_key(hw, *suffix)
        parts = key.split(".")
        assert len(parts) == 2 + len(suffix)
        assert parts[0] == "device" and unword(parts[1]) == hw
        assert tuple(parts[2:]) == suffix
    key = call_key(hw, call, kind)
    parts = key.split(".")
    assert len(parts) == 5
    assert parts[0] == "device" and unword(parts[1]) == hw
    assert parts[2] == "call" and int(parts[3]) == call and parts[4] == kind
    g = gap_key(hw).split(".")
    assert len(g) == 3 and g[0] == "bridge" and unword(g[1]) == hw and g[2] == "gap"


@pytest.mark.parametrize("key, expected", [
    ("device.009033400001.call.17.state", None),  # an event key, not a command
    ("device.00%3A90%3A33.call.-1.signaling", None),
])
def test_event_keys_are_not_commands(key: str, expected: object) -> None:
    assert parse_command_key(key) is expected


def test_key_examples() -> None:
    assert device_key("00:90:33", "attached") == "device.00%3A90%3A33.attached"
    assert call_key("009033400001", 17, "state") == "device.009033400001.call.17.state"
    assert call_key("a.b", -2, "signaling") == "device.a%2Eb.call.-2.signaling"
    assert gap_key("bridge-1") == "bridge.bridge-1.gap"
    assert gap_key("host.local") == "bridge.host%2Elocal.gap"
    assert commands_of("00:90:33") == "device.00%3A90%3A33.*"  # a lease queue's binding


@pytest.mark.parametrize("key, expected", [
    ("device.009033400001.attach", ("009033400001", "attach")),
    ("device.009033400001.detach", ("009033400001", "detach")),
    ("device.009033400001.signaling", ("009033400001", "signaling")),
    ("device.00%3A90%3A33.attach", ("00:90:33", "attach")),
    ("device.a%2Eb.signaling", ("a.b", "signaling")),
    ("device.%C3%BC.attach", ("ü", "attach")),
])
def test_parse_good_command_keys(key: str, expected: tuple[str, str]) -> None:
    assert parse_command_key(key) == expected


@pytest.mark.parametrize("key", [
    "",
    "device",
    "device.x",
    "device..attach",  # empty hw
    "device.a.b.attach",  # an unescaped dot splits the hw
    "devices.x.attach",
    "bridge.x.attach",
    "Device.x.attach",
    "device.x.attach.extra",
    "device.x.call.1.state",
    "device.%FF.attach",  # not UTF-8
    "device.%C3.attach",  # truncated UTF-8
])
def test_parse_bad_command_keys(key: str) -> None:
    assert parse_command_key(key) is None


@given(hw=ids, verb=st.sampled_from(["attach", "detach", "signaling", "intercept"]))
@settings(max_examples=300, deadline=None)
def test_parse_command_key_round_trip(hw: str, verb: str) -> None:
    assert parse_command_key(device_key(hw, verb)) == (hw, verb)


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_parse_command_key_never_raises(key: str) -> None:
    out = parse_command_key(key)
    assert out is None or (isinstance(out, tuple) and len(out) == 2 and out[0] != "")


@given(ids, st.integers(min_value=-2**31, max_value=2**31 - 1))
@settings(max_examples=200, deadline=None)
def test_every_event_key_follows_its_type_s_template(hw: str, call: int) -> None:
    """The grammar lives in routing.EVENT_KEYS: the factory's keys of each type match that
    type's template and no other (span names and the contracts read the table)."""
    from msgspec import Raw

    from bridge.events import EventFactory
    from bridge.protocol.callstate import CallStatus
    from bridge.protocol.messages import AttachResult, CallState
    from bridge.routing import EVENT_KEYS, template_of

    f = EventFactory("inst.1")
    made = [f.attached(hw, AttachResult()), f.detached(hw, "command"), f.attach_failed(hw, "no"),
            f.call_state(hw, CallStatus(call=call, state=CallState.ALERT, in_=True)),
            f.signaling(hw, call, True, Raw(b"{}"), "pbx"), f.gap("buffer-full", {hw: [(1, 2)]}),
            f.intercepted(hw, call, True, "i/h/i1", "setup", "forward", "forwarded", 1.0)]
    assert {e.type for e in made} | {"call.intercept"} == set(EVENT_KEYS)
    for e in made:
        assert template_of(e.key) == EVENT_KEYS[e.type], (e.type, e.key)
    # an intercept request is not an event (not numbered), but its key follows the grammar too
    assert template_of(call_key(hw, call, "intercept")) == EVENT_KEYS["call.intercept"]


def test_command_keys_and_other_keys_have_templates() -> None:
    from bridge.routing import COMMAND_KEYS, VERBS, template_of

    for verb in VERBS:
        assert template_of(device_key("00:90:33", verb)) == COMMAND_KEYS[verb]
        assert parse_command_key(device_key("00:90:33", verb)) == ("00:90:33", verb)
    assert template_of("device.x.call.1.other") == template_of("elsewhere") == "{other}"


def test_a_binding_matches_every_key_of_its_kind_and_no_other():
    """``binding(kind)``: the template with each word a ``*`` (what tail and the deciders bind)."""
    from bridge.routing import EVENT_KEYS, binding

    assert binding("call.state") == "device.*.call.*.state"
    assert binding("gap") == "bridge.*.gap"
    keys = {kind: t.format(hw=word("00:90:33"), call=7, instance=word("a.b")) for kind, t in EVENT_KEYS.items()}
    for kind in EVENT_KEYS:
        rx = re.compile("^" + re.escape(binding(kind)).replace(r"\*", "[^.]+") + "$")  # AMQP's `*`: one word
        assert [k for k, key in keys.items() if rx.match(key)] == [kind]
