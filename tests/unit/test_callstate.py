"""CallTracker: Sync and Signaling in, call snapshots out (table-driven scenarios).

Each scenario is a list of steps ``(direction, data, expect)``:

- direction ``TO``: a Signaling toward the device (from the PBX side); ``FROM``: from the device;
  ``SYNC``: a Sync at attach, ``data`` being its ``info`` object;
- ``data``: the sig (or Sync info) as JSON, turned into the typed view as the bridge does;
- ``expect``: None when nothing a consumer cares about changed, else ``(state, changes)``: the
  emitted snapshot is the previous one with ``state`` and the ``changes`` applied (for SYNC: a
  fresh snapshot). Every emitted snapshot is compared whole, field by field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from msgspec import structs

from bridge.protocol.callstate import CallStatus, CallTracker
from bridge.protocol.messages import CallState, Remote, Sync, decode
from bridge.protocol.signal import Cause, decode_sig

TO, FROM, SYNC = "to", "from", "sync"

S = CallState
SETUP, SETUP_ACK, CALL_PROC, ALERT = S.SETUP, S.SETUP_ACK, S.CALL_PROC, S.ALERT
CONNECTED, DISCONNECTED, DISCONNECTING = S.CONNECTED, S.DISCONNECTED, S.DISCONNECTING
PARKED, RELEASED, NULL = S.PARKED, S.RELEASED, S.NULL


def name(n: str) -> dict:
    return {"type": "name_identification", "name": n}


@dataclass
class Scenario:
    id: str
    call: int
    steps: list[tuple[str, dict, Any]]
    left: int = 0  # calls the tracker still knows at the end
    notes: str = field(default="")


SCENARIOS = [
    Scenario("incoming-answered-remote-hangs-up", 17, [
        (TO, {"type": "setup", "bc": "8090a2", "cg": {"num": "201", "sip": "bob"},
              "cd": {"num": "100"}, "fty": [name("Bob")], "x-unknown": {"a": [1]}},
         (SETUP, dict(in_=True, remote=Remote(num="201", sip="bob", dn="Bob")))),
        (FROM, {"type": "alert"}, (ALERT, {})),
        (FROM, {"type": "conn", "channel": -1, "channels": {"source": "local", "ch": []}},
         (CONNECTED, dict(channel=-1))),
        (TO, {"type": "disc"}, (DISCONNECTED, {})),
        (FROM, {"type": "rel", "cau": {"loc": 0, "num": 16}},
         (RELEASED, dict(cause=Cause(loc=0, num=16)))),
    ]),
    Scenario("outgoing-answered-device-hangs-up", 5, [
        (FROM, {"type": "setup", "cg": {"num": "100", "sip": "me"},
                "cd": {"num": "202", "sip": "carol"}, "complete": True},
         (SETUP, dict(in_=False, remote=Remote(num="202", sip="carol")))),
        (TO, {"type": "call_proc"}, (CALL_PROC, {})),
        (TO, {"type": "alert", "fty": [name("Carol")]},
         (ALERT, dict(remote=Remote(num="202", sip="carol", dn="Carol")))),
        (TO, {"type": "conn", "channel": -1}, (CONNECTED, dict(channel=-1))),
        (FROM, {"type": "disc"}, (DISCONNECTING, {})),
        (TO, {"type": "rel"}, (RELEASED, {})),
    ]),
    Scenario("outgoing-busy", 6, [
        (FROM, {"type": "setup", "cd": {"num": "203"}},
         (SETUP, dict(in_=False, remote=Remote(num="203")))),
        (TO, {"type": "rel", "cau": {"loc": 1, "num": 17}},
         (RELEASED, dict(cause=Cause(loc=1, num=17)))),
    ]),
    Scenario("incoming-rejected-by-device", 7, [
        (TO, {"type": "setup", "cg": {"num": "N07031204"}, "fty": [name("Dora")]},
         (SETUP, dict(in_=True, remote=Remote(num="N07031204", dn="Dora")))),
        (FROM, {"type": "alert"}, (ALERT, {})),
        (FROM, {"type": "rel", "cau": {"num": 21}}, (RELEASED, dict(cause=Cause(num=21)))),
    ]),
    Scenario("outgoing-no-answer-disc-then-rel", 8, [
        (FROM, {"type": "setup", "cd": {"num": "205", "sip": "eve"}},
         (SETUP, dict(in_=False, remote=Remote(num="205", sip="eve")))),
        (TO, {"type": "alert", "channel": 0}, (ALERT, dict(channel=0))),
        (TO, {"type": "disc", "cau": {"loc": 2, "num": 19}},
         (DISCONNECTED, dict(cause=Cause(loc=2, num=19)))),
        (FROM, {"type": "rel"}, (RELEASED, {})),  # the disc's cause stays
    ]),
    Scenario("incoming-no-answer-rel", 9, [
        (TO, {"type": "setup", "cg": {"num": "206"}},
         (SETUP, dict(in_=True, remote=Remote(num="206")))),
        (FROM, {"type": "alert"}, (ALERT, {})),
        (TO, {"type": "rel", "cau": {"num": 19}}, (RELEASED, dict(cause=Cause(num=19)))),
    ]),
    Scenario("rel-cause-replaces-disc-cause", 10, [
        (TO, {"type": "setup", "cg": {"num": "207"}},
         (SETUP, dict(in_=True, remote=Remote(num="207")))),
        (TO, {"type": "disc", "cau": {"num": 19}}, (DISCONNECTED, dict(cause=Cause(num=19)))),
        (FROM, {"type": "rel", "cau": {"num": 16}}, (RELEASED, dict(cause=Cause(num=16)))),
    ]),
    Scenario("hold-retrieve", 11, [
        (TO, {"type": "setup", "cg": {"num": "208"}},
         (SETUP, dict(in_=True, remote=Remote(num="208")))),
        (FROM, {"type": "conn"}, (CONNECTED, {})),
        (TO, {"type": "facility", "fty": [{"type": "hold_notify"}]}, (CONNECTED, dict(held=True))),
        (TO, {"type": "facility", "fty": [{"type": "hold_notify"}]}, None),  # already held
        (TO, {"type": "facility", "fty": [{"type": "retrieve_notify"}]},
         (CONNECTED, dict(held=False))),
        (FROM, {"type": "facility", "fty": [{"type": "hold_notify", "x": 1}]},
         (CONNECTED, dict(held=True))),  # the device holds
        (FROM, {"type": "facility", "fty": [{"type": "retrieve_notify"}]},
         (CONNECTED, dict(held=False))),
    ], left=1),
    Scenario("park", 12, [
        (FROM, {"type": "setup", "cd": {"num": "209"}},
         (SETUP, dict(in_=False, remote=Remote(num="209")))),
        (TO, {"type": "conn"}, (CONNECTED, {})),
        (FROM, {"type": "facility", "fty": [{"type": "cp_park", "cp": {"num": "77"}}]},
         (PARKED, {})),
        (TO, {"type": "rel", "cau": {"num": 16}}, (RELEASED, dict(cause=Cause(num=16)))),
    ]),
    Scenario("overlap-dialing", 13, [
        (FROM, {"type": "setup", "cd": {"num": "2"}},
         (SETUP, dict(in_=False, remote=Remote(num="2")))),
        (TO, {"type": "setup_ack"}, (SETUP_ACK, {})),
        (FROM, {"type": "info", "cd": {"num": "0"}}, (SETUP_ACK, dict(remote=Remote(num="20")))),
        (FROM, {"type": "info", "cd": {"num": "1"}}, (SETUP_ACK, dict(remote=Remote(num="201")))),
        (FROM, {"type": "info", "dsp": "x"}, None),  # no digits
        (TO, {"type": "call_proc"}, (CALL_PROC, {})),
        (FROM, {"type": "info", "cd": {"num": "9"}}, None),  # dialing is over
        (TO, {"type": "alert"}, (ALERT, {})),
    ], left=1),
    Scenario("overlap-dialing-from-empty-setup", 14, [
        (FROM, {"type": "setup"}, (SETUP, dict(in_=False))),
        (FROM, {"type": "info", "cd": {"num": "4"}}, (SETUP, dict(remote=Remote(num="4")))),
        (TO, {"type": "setup_ack"}, (SETUP_ACK, {})),
        (FROM, {"type": "info", "cd": {"num": "2"}, "complete": True},
         (SETUP_ACK, dict(remote=Remote(num="42")))),
    ], left=1),
    Scenario("app-call-toward-device", -1, [
        (TO, {"type": "setup", "cg": {"num": "300", "sip": "app"}, "fty": [name("App")]},
         (SETUP, dict(in_=True, app=True, remote=Remote(num="300", sip="app", dn="App")))),
        (FROM, {"type": "alert"}, (ALERT, {})),
        (FROM, {"type": "conn"}, (CONNECTED, {})),
        (TO, {"type": "rel"}, (RELEASED, {})),
    ]),
    Scenario("app-call-toward-pbx", -2, [
        (FROM, {"type": "setup", "cd": {"num": "301"}},
         (SETUP, dict(in_=False, app=True, remote=Remote(num="301")))),
        (TO, {"type": "alert"}, (ALERT, {})),
    ], left=1),
    Scenario("sync-at-attach-then-answered", 17, [
        (SYNC, {"channel": -1, "in": True, "state": "alert",
                "remote": {"num": "201", "sip": "bob", "dn": "Bob"}},
         (ALERT, dict(in_=True, channel=-1, remote=Remote(num="201", sip="bob", dn="Bob")))),
        (SYNC, {"channel": -1, "in": True, "state": "alert",
                "remote": {"num": "201", "sip": "bob", "dn": "Bob"}},
         (ALERT, dict(in_=True, channel=-1, remote=Remote(num="201", sip="bob", dn="Bob")))),
        (FROM, {"type": "conn"}, (CONNECTED, {})),
        (TO, {"type": "disc"}, (DISCONNECTED, {})),
    ], left=1),
    Scenario("sync-null-state-minimal", 20, [
        (SYNC, {"state": None}, (NULL, {})),
        (SYNC, {}, (NULL, {})),
    ], left=1),
    Scenario("sync-app-call", -7, [
        (SYNC, {"channel": 0, "in": False, "state": "connected", "remote": {"num": "55"}},
         (CONNECTED, dict(in_=False, channel=0, app=True, remote=Remote(num="55")))),
        (TO, {"type": "facility", "fty": [{"type": "hold_notify"}]}, (CONNECTED, dict(held=True))),
    ], left=1),
    Scenario("sync-parked", 21, [
        (SYNC, {"in": True, "state": "parked"}, (PARKED, dict(in_=True))),
    ], left=1),
    Scenario("unknown-call-mid-call", 99, [
        (FROM, {"type": "conn"}, (CONNECTED, dict(in_=None))),
        (TO, {"type": "facility", "fty": [name("Zed")]},
         (CONNECTED, dict(remote=Remote(dn="Zed")))),
        (TO, {"type": "disc", "cau": {"num": 16}}, (DISCONNECTED, dict(cause=Cause(num=16)))),
        (FROM, {"type": "rel"}, (RELEASED, {})),
    ]),
    Scenario("unknown-call-without-state", 98, [
        (TO, {"type": "progress"}, (NULL, {})),  # a new call is always reported
        (TO, {"type": "progress"}, None),
        (TO, {"type": "alert"}, (ALERT, {})),
    ], left=1),
    Scenario("unchanged-repeats-emit-nothing", 30, [
        (TO, {"type": "setup", "cg": {"num": "210"}},
         (SETUP, dict(in_=True, remote=Remote(num="210")))),
        (TO, {"type": "setup", "cg": {"num": "210"}}, None),  # retransmitted setup
        (FROM, {"type": "call_proc"}, (CALL_PROC, {})),
        (FROM, {"type": "call_proc"}, None),
        (FROM, {"type": "alert"}, (ALERT, {})),
        (FROM, {"type": "alert"}, None),
        (TO, {"type": "progress", "pi": 8}, None),
        (TO, {"type": "facility", "fty": [{"type": "presence_notify"}]}, None),
        (TO, {"type": "user_info", "uui": "x"}, None),
        (FROM, {"type": "conn", "channel": -1}, (CONNECTED, dict(channel=-1))),
        (FROM, {"type": "conn", "channel": -1}, None),
        (TO, {"type": "facility", "fty": [name("Ann")]}, (CONNECTED, dict(remote=Remote(num="210", dn="Ann")))),
        (TO, {"type": "facility", "fty": [name("Ann")]}, None),
    ], left=1),
    Scenario("remote-name-update-and-channel-change", 31, [
        (TO, {"type": "setup", "cg": {"num": "211", "sip": "fred"}},
         (SETUP, dict(in_=True, remote=Remote(num="211", sip="fred")))),
        (FROM, {"type": "conn", "channel": 0}, (CONNECTED, dict(channel=0))),
        (TO, {"type": "facility", "fty": [{"type": "ct_initiate", "cd": {"num": "9"}}, name("Greta")]},
         (CONNECTED, dict(remote=Remote(num="211", sip="fred", dn="Greta")))),
        (TO, {"type": "channels", "channel": -1}, (CONNECTED, dict(channel=-1))),
    ], left=1),
]


def sig(data: dict):
    return decode_sig(json.dumps(data).encode())


def sync_msg(call: int, info: dict) -> Sync:
    frame = json.dumps({"api": "EpSignal", "mt": "Sync", "src": "a", "call": call, "info": info})
    msg = decode(frame.encode())
    assert isinstance(msg, Sync)
    return msg


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_scenario(sc: Scenario) -> None:
    tracker = CallTracker()
    snapshot: CallStatus | None = None
    emitted, wanted = [], []
    for i, (direction, data, expect) in enumerate(sc.steps):
        if direction == SYNC:
            got = tracker.sync(sync_msg(sc.call, data))
        else:
            got = tracker.signaling(sc.call, direction == TO, sig(data))
        if expect is None:
            assert got is None, f"step {i}: {data} emitted {got}"
            continue
        state, changes = expect
        if direction == SYNC or snapshot is None:
            snapshot = CallStatus(call=sc.call, state=state, **changes)
        else:
            snapshot = structs.replace(snapshot, state=state, **changes)
        assert got == snapshot, f"step {i}: {data}"
        emitted.append(got)
        wanted.append(snapshot)
        # the tracker keeps the call until it is released
        assert tracker.get(sc.call) == (None if state is RELEASED else snapshot)
    assert emitted == wanted
    assert len(tracker) == sc.left


def test_incoming_call_fields_spelled_out() -> None:
    """The first scenario once more, asserting each field by name."""
    t = CallTracker()
    s = t.signaling(17, True, sig({"type": "setup", "cg": {"num": "201", "sip": "bob"},
                                   "fty": [name("Bob")]}))
    assert s.call == 17 and s.state is CallState.SETUP
    assert s.in_ is True and s.app is False and s.held is False
    assert (s.remote.num, s.remote.sip, s.remote.dn) == ("201", "bob", "Bob")
    assert s.channel is None and s.cause is None
    t.signaling(17, False, sig({"type": "conn", "channel": -1}))
    s = t.signaling(17, False, sig({"type": "rel", "cau": {"loc": 0, "num": 16}}))
    assert s.state is CallState.RELEASED
    assert s.cause.num == 16 and s.cause.loc == 0
    assert s.channel == -1
    assert len(t) == 0 and t.get(17) is None and t.calls() == []


def test_disc_direction_decides_who_hung_up() -> None:
    t = CallTracker()
    t.signaling(1, True, sig({"type": "conn"}))
    t.signaling(2, True, sig({"type": "conn"}))
    assert t.signaling(1, True, sig({"type": "disc"})).state is CallState.DISCONNECTED
    assert t.signaling(2, False, sig({"type": "disc"})).state is CallState.DISCONNECTING


def test_calls_are_tracked_independently() -> None:
    t = CallTracker()
    a = t.signaling(1, True, sig({"type": "setup", "cg": {"num": "201"}}))
    b = t.signaling(2, False, sig({"type": "setup", "cd": {"num": "202"}}))
    t.signaling(1, False, sig({"type": "conn"}))
    assert len(t) == 2
    assert t.get(1).state is CallState.CONNECTED and t.get(1).remote.num == "201"
    assert t.get(2) == b and b.state is CallState.SETUP and b.in_ is False
    assert a.state is CallState.SETUP  # snapshots are frozen values
    assert {c.call for c in t.calls()} == {1, 2}
    t.signaling(2, True, sig({"type": "rel", "cau": {"num": 17}}))
    assert [c.call for c in t.calls()] == [1]


def test_snapshots_are_immutable() -> None:
    s = CallTracker().signaling(1, True, sig({"type": "setup"}))
    with pytest.raises(AttributeError):
        s.state = CallState.ALERT  # type: ignore[misc]


def test_sync_always_emits_even_twice() -> None:
    t = CallTracker()
    msg = sync_msg(17, {"channel": -1, "in": True, "state": "alert",
                        "remote": {"num": "201", "sip": "bob", "dn": "Bob"}})
    first = t.sync(msg)
    second = t.sync(msg)
    assert first is not None and second is not None
    assert first == second
    assert first.state is CallState.ALERT and first.in_ is True and first.channel == -1
    assert first.remote == Remote(num="201", sip="bob", dn="Bob")
    assert len(t) == 1


def test_sync_replaces_a_known_call() -> None:
    t = CallTracker()
    t.signaling(4, True, sig({"type": "setup", "cg": {"num": "1"}}))
    s = t.sync(sync_msg(4, {"in": True, "state": "connected", "remote": {"num": "2"}}))
    assert s.state is CallState.CONNECTED and s.remote == Remote(num="2")
    assert t.get(4) == s


def test_unknown_call_has_in_unknown() -> None:
    t = CallTracker()
    s = t.signaling(50, True, sig({"type": "alert", "cg": {"num": "7"}}))
    assert s is not None
    assert s.in_ is None
    assert s.state is CallState.ALERT
    assert s.app is False


def test_release_all() -> None:
    t = CallTracker()
    t.signaling(1, True, sig({"type": "setup", "cg": {"num": "201"}}))
    t.signaling(1, False, sig({"type": "conn", "channel": -1}))
    t.signaling(-3, False, sig({"type": "setup", "cd": {"num": "202"}}))
    t.sync(sync_msg(9, {"state": "parked", "in": False}))
    before = {c.call: c for c in t.calls()}
    cause = Cause(num=41, loc=0)
    out = t.release_all(cause)
    assert {c.call for c in out} == {1, -3, 9}
    for c in out:
        assert c.state is CallState.RELEASED
        assert c.cause == cause
        # everything else is what the call last was
        assert structs.replace(c, state=before[c.call].state, cause=before[c.call].cause) == before[c.call]
    assert next(c for c in out if c.call == -3).app is True
    assert next(c for c in out if c.call == 1).channel == -1
    assert len(t) == 0 and t.calls() == []
    assert t.release_all() == []


def test_release_all_without_cause() -> None:
    t = CallTracker()
    t.signaling(1, True, sig({"type": "disc", "cau": {"num": 16}}))
    (s,) = t.release_all()
    assert s.state is CallState.RELEASED and s.cause is None


def test_new_setup_after_release_is_a_new_call() -> None:
    t = CallTracker()
    t.signaling(1, True, sig({"type": "setup", "cg": {"num": "201"}}))
    t.signaling(1, True, sig({"type": "rel", "cau": {"num": 16}}))
    s = t.signaling(1, False, sig({"type": "setup", "cd": {"num": "300"}}))
    assert s == CallStatus(call=1, state=CallState.SETUP, in_=False, remote=Remote(num="300"))


def test_status_encodes_in_as_in() -> None:
    import msgspec

    s = CallTracker().signaling(1, True, sig({"type": "setup", "cg": {"num": "201"}}))
    out = json.loads(msgspec.json.encode(s))
    assert out["in"] is True and "in_" not in out
    assert out["state"] == "setup" and out["remote"] == {"num": "201"}


def test_name_identification_from_the_device_names_the_device_not_the_remote():
    """Seen in the demo: the device's alert carries its own name; the remote dn must stay."""
    from bridge.protocol.callstate import CallTracker
    from bridge.protocol.signal import decode_sig

    t = CallTracker()
    t.signaling(4, True, decode_sig(b'{"type":"setup","cg":{"num":"297"},'
                                    b'"fty":[{"type":"name_identification","name":"Remote 297"}]}'))
    s = t.signaling(4, False, decode_sig(b'{"type":"alert","fty":[{"type":"name_identification","name":"User 1"}]}'))
    assert s.state.value == "alert" and s.remote.dn == "Remote 297"
    out = CallTracker()
    s = out.signaling(5, False, decode_sig(b'{"type":"setup","cd":{"num":"296"},'
                                           b'"fty":[{"type":"name_identification","name":"User 3"}]}'))
    assert s.remote.num == "296" and s.remote.dn is None
