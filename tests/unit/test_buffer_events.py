"""The event buffer, the event factory, commands parsing and the Device: pure, no broker."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import commands as cmds
from bridge.buffer import EventBuffer
from bridge.device import Device
from bridge.events import EventFactory
from bridge.protocol import messages as m


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def ev(f: EventFactory, hw: str = "hw1"):
    return f.detached(hw, "command")


def test_buffer_keeps_order_and_requeues_failed_in_front():
    f = EventFactory("i")
    b = EventBuffer(100, 60, Clock())
    for _ in range(5):
        b.append(ev(f))
    e1, e2, e3 = b.take(), b.take(), b.take()
    b.confirm(e2)
    b.requeue([e3, e1])
    order = [b.take().event.seq for _ in range(4)]
    assert order == [1, 3, 4, 5]
    assert b.take() is None and len(b) == 4 and b.stats.confirmed == 1


def test_buffer_drops_oldest_when_full_and_reports_gap_ranges():
    f = EventFactory("i")
    b = EventBuffer(3, 60, Clock())
    for i in range(6):
        b.append(ev(f, "a" if i % 2 == 0 else "b"))
    assert len(b) == 3 and b.stats.dropped_full == 3 and b.in_episode
    reason, dropped = b.take_gaps()
    assert reason == "buffer-full" and dropped == {"a": [(1, 2)], "b": [(1, 1)]}
    assert b.take_gaps() is None
    while (e := b.take()) is not None:
        b.confirm(e)
    assert not b.in_episode and b.stats.episodes == 1


def test_buffer_drops_too_old_events_unsent():
    clock = Clock()
    f = EventFactory("i")
    b = EventBuffer(100, 10, clock)
    for _ in range(3):
        b.append(ev(f))
    clock.t = 11
    b.append(ev(f))
    assert b.take().event.seq == 4
    assert b.stats.dropped_age == 3 and b.take_gaps() == ("too-old", {"hw1": [(1, 3)]})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["append", "take", "confirm", "fail"]), max_size=80))
def test_buffer_never_loses_an_event_without_counting_it(ops):
    """Whatever happens, every appended event is confirmed, still buffered, or counted dropped."""
    f = EventFactory("i")
    b = EventBuffer(10, 1e9, Clock())
    inflight = []
    for op in ops:
        if op == "append":
            b.append(ev(f))
        elif op == "take" and (e := b.take()):
            inflight.append(e)
        elif op == "confirm" and inflight:
            b.confirm(inflight.pop(0))
        elif op == "fail" and inflight:
            b.requeue(inflight)
            inflight = []
    s = b.stats
    assert s.appended == s.confirmed + len(b) + s.dropped_full + s.dropped_age


def test_event_factory_numbers_per_device_without_gaps():
    f = EventFactory("inst")
    a1, b1, a2 = f.detached("a", "x"), f.detached("b", "x"), f.detached("a", "x")
    assert (a1.seq, b1.seq, a2.seq) == (1, 1, 2)
    assert a2.message_id == "inst/a/2" and a2.key == "device.a.detached" and a2.type == "detached"
    body = json.loads(a2.body)
    assert body["type"] == "detached" and body["instance"] == "inst" and body["time"].endswith("Z")


def test_attached_event_never_carries_the_turn_password():
    f = EventFactory("i")
    res = m.AttachResult(turnUsr="u", turnPwd="TOPSECRET", stun="a;b", turn="t")
    out = f.attached("hw", res)
    assert b"TOPSECRET" not in out.body and json.loads(out.body)["attach"]["stun"] == ["a", "b"]
    assert "TOPSECRET" not in repr(res)


def test_device_turns_frames_into_events_and_publishes_sig_losslessly():
    d = Device("hw", EventFactory("i"))
    raw = b'{"type":"setup","cg":{"num":"201"},"zz":{"unknown":[1,2.5,null]}}'
    frame = b'{"api":"EpSignal","mt":"Signaling","src":"hw","call":3,"to":true,"sig":' + raw + b"}"
    out = d.on_frame(m.decode(frame))
    assert [o.type for o in out] == ["call.signaling", "call.state"]
    sig_ev = msgspec.json.decode(out[0].body)
    assert json.dumps(sig_ev["sig"]) == json.dumps(json.loads(raw)) and sig_ev["to"] is True
    assert out[0].body.find(raw) > 0  # byte for byte inside the event
    state = json.loads(out[1].body)
    assert state["state"] == "setup" and state["in"] is True and state["remote"]["num"] == "201"


def test_device_with_unreadable_sig_still_publishes_signaling():
    d = Device("hw", EventFactory("i"))
    frame = b'{"api":"EpSignal","mt":"Signaling","call":3,"sig":{"type":"setup","cg":5}}'
    out = d.on_frame(m.decode(frame))
    assert [o.type for o in out] == ["call.signaling"] and d.bad_sig == 1


@pytest.mark.parametrize("key,body,needle", [
    ("device.hw.signaling", b'{"call":1,"v":2,"sig":{"type":"alert"}}', "unsupported schema version v=2"),
    ("device.hw.attach", b'{"v":0}', "unsupported schema version v=0"),
    ("device.hw.signaling", b"", "not JSON"),
    ("device.hw.attach", b"[1]", "Expected `object`"),
    ("device..attach", b"", "routing key"),
    ("device.a.b.attach", b"", "routing key"),
    ("device.hw.reboot", b"", "unknown command 'reboot'"),
    ("device.hw.signaling", b'{"call":1,"sig":{"type":"alert"}}' + b" " * 70000, "exceeds the limit"),
])
def test_bad_commands_name_what_is_wrong(key, body, needle):
    with pytest.raises(cmds.CommandError, match=None) as e:
        cmds.parse(key, body)
    assert needle in str(e.value)


def test_good_commands_parse():
    assert cmds.parse("device.a%2Eb.attach", b"")[:2] == ("a.b", "attach")
    hw, verb, c = cmds.parse("device.x.signaling", b'{"call":-1,"to":true,"sig":{"type":"setup","q":[1]}}')
    assert (hw, verb) == ("x", "signaling")
    assert (c.call, c.to, bytes(c.sig)) == (-1, True, b'{"type":"setup","q":[1]}')


def test_a_dropped_gap_announcement_is_announced_again():
    f = EventFactory("i")
    b = EventBuffer(3, 60, Clock())
    for _ in range(4):
        b.append(ev(f))  # drops seq 1
    reason, dropped = b.take_gaps()
    b.push_front(f.gap(reason, dropped))
    for _ in range(2):
        b.append(ev(f))  # drops the gap event, then seq 2
    assert b.stats.dropped_full == 2  # device events only
    assert b.take_gaps() == ("buffer-full", {"hw1": [(1, 2)]})


def test_a_deployment_publishing_call_states_only_numbers_them_without_gaps():
    f = EventFactory("i", ("call.state",))
    d = Device("hw", f)
    frames = [b'{"api":"EpSignal","mt":"Attached"}',
              b'{"api":"EpSignal","mt":"Signaling","call":3,"to":true,"sig":{"type":"setup","cg":{"num":"201"}}}',
              b'{"api":"EpSignal","mt":"Signaling","call":3,"sig":{"type":"alert"}}',
              b'{"api":"EpSignal","mt":"Signaling","call":3,"sig":{"type":"rel"}}',
              b'{"api":"EpSignal","mt":"Detached"}']
    out = [ev for fr in frames for ev in d.on_frame(m.decode(fr))]
    assert [(o.type, o.seq) for o in out] == [("call.state", 1), ("call.state", 2), ("call.state", 3)]
    assert [json.loads(o.body)["state"] for o in out] == ["setup", "alert", "released"]
    assert d.on_lost("command") == []  # detached is not published either


def test_unknown_event_kinds_are_refused_naming_the_kinds():
    with pytest.raises(ValueError, match=r"call\.signaling"):
        EventFactory("i", ("call.states",))
