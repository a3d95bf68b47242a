"""Bounds on what a PBX controls and the bridge keeps or repeats (issue 13, section 5), on the
pure core: the call tracker (number, sip, dn, cause; calls per device; idle expiry, on an injected
clock), the Device (AttachResult fields, eviction events, trace contexts), the log filter, and
the settings. Each test feeds far more than its bound; tests/faults/test_hostile_sizes.py does
the same through a real session and measures the bridge's RSS.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import weakref

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import tracing
from bridge.config import Settings
from bridge.device import MAX_ATTACH_TEXT, Device
from bridge.events import EventFactory
from bridge.logs import MAX_ARG_CHARS, MAX_EXC_CHARS, MAX_MSG_CHARS, BoundLength, JsonFormatter, RedactSecrets
from bridge.protocol import messages as m
from bridge.protocol.callstate import CUT, MAX_NUM, MAX_TEXT, SCAN_S, CallLimits, CallTracker
from bridge.protocol.messages import CallState
from bridge.protocol.signal import decode_sig

HW = "009033400001"
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def sig(obj: dict):
    return decode_sig(json.dumps(obj).encode())


def sync(call: int, info: dict) -> m.Sync:
    return m.decode(json.dumps({"api": "EpSignal", "mt": "Sync", "call": call, "info": info}).encode())


def signaling(call: int, obj: dict, to: bool = True) -> m.Signaling:
    frame = {"api": "EpSignal", "mt": "Signaling", "src": HW, "call": call, "sig": obj}
    if to:
        frame["to"] = True
    return m.decode(json.dumps(frame).encode())


# ------------------------------------------------------------------------------- strings of a call
def test_overlap_dialing_stops_at_the_bound_and_publishes_nothing_more():
    t = CallTracker()
    t.signaling(1, False, sig({"type": "setup", "cd": {"num": "0"}}))
    digits = sig({"type": "info", "cd": {"num": "7" * 20_000}})
    first = t.signaling(1, False, digits)
    assert len(first.remote.num) == MAX_NUM and first.remote.num == "0" + "7" * (MAX_NUM - 2) + CUT
    assert all(t.signaling(1, False, digits) is None for _ in range(10_000))  # 200 MB of digits
    assert t.get(1) == first


def test_overlap_dialing_below_the_bound_is_untouched():
    t = CallTracker()
    t.signaling(1, False, sig({"type": "setup", "cd": {"num": "0"}}))
    for d in "7031730":
        s = t.signaling(1, False, sig({"type": "info", "cd": {"num": d}}))
    assert s.remote.num == "07031730"
    # up to the bound exactly, nothing is cut
    s = t.signaling(1, False, sig({"type": "info", "cd": {"num": "1" * (MAX_NUM - 8)}}))
    assert len(s.remote.num) == MAX_NUM and CUT not in s.remote.num


def test_every_remote_string_and_the_cause_are_bounded():
    big = "x" * 80_000
    t = CallTracker()
    s = t.signaling(1, True, sig({"type": "setup", "cg": {"num": big, "sip": big},
                                  "fty": [{"type": "name_identification", "name": big}]}))
    assert (len(s.remote.num), len(s.remote.sip), len(s.remote.dn)) == (MAX_NUM, MAX_TEXT, MAX_TEXT)
    assert s.remote.num.endswith(CUT) and s.remote.sip.endswith(CUT) and s.remote.dn.endswith(CUT)
    s = t.signaling(1, True, sig({"type": "disc", "cau": {"num": 16, "loc": big}}))
    assert s.cause.num == 16 and len(s.cause.loc) == MAX_TEXT
    s = t.signaling(2, True, sig({"type": "rel", "cau": {"num": 16, "loc": list(range(50_000))}}))
    assert isinstance(s.cause.loc, str) and len(s.cause.loc) == MAX_TEXT and s.cause.loc.startswith("[0,1,2")
    s = t.signaling(3, True, sig({"type": "rel", "cau": {"num": 16, "loc": {"a": 1}}}))
    assert s.cause.loc == {"a": 1}  # small values stay as they came
    s = t.sync(sync(4, {"state": "connected", "remote": {"num": big, "sip": big, "dn": big}}))
    assert (len(s.remote.num), len(s.remote.sip), len(s.remote.dn)) == (MAX_NUM, MAX_TEXT, MAX_TEXT)


# ------------------------------------------------------------------------------- calls per device
def test_never_released_calls_stay_bounded_and_the_least_recently_signaled_goes():
    clock = Clock()
    t = CallTracker(CallLimits(max_calls=100), clock)
    t.signaling(7, True, sig({"type": "setup", "cg": {"num": "201"}}))
    t.signaling(7, False, sig({"type": "conn"}))
    gone = []
    for c in range(1000, 51_000):
        clock.t += 0.001
        t.signaling(c, True, sig({"type": "setup"}))
        if c % 50 == 0:
            t.signaling(7, True, sig({"type": "facility"}))  # call 7 keeps talking
        gone += t.expire()
        assert len(t) <= 100
    assert len(gone) == 50_000 + 1 - 100
    assert t.get(7) is not None and t.get(7).state is CallState.CONNECTED
    assert all(g.state is CallState.RELEASED and g.evicted == "too-many-calls" and g.cause is None for g in gone)
    assert [g.call for g in gone[:3]] == [1000, 1001, 1002]  # oldest first
    assert len(t._seen) == len(t)


def test_idle_calls_expire_connected_ones_only_much_later():
    clock = Clock()
    t = CallTracker(CallLimits(max_calls=10, idle_s=HOUR, connected_idle_s=24 * HOUR), clock)
    t.signaling(1, True, sig({"type": "setup"}))          # rings and is forgotten by the PBX
    t.signaling(2, True, sig({"type": "setup"}))
    t.signaling(2, False, sig({"type": "conn"}))          # a long, silent call
    t.sync(sync(3, {"state": None}))                       # state unknown: may be connected
    t.signaling(4, False, sig({"type": "disc"}))          # the device hung up, no rel came

    def tick(seconds: float) -> list:
        clock.t += seconds
        t.signaling(99, True, sig({"type": "alert"}))      # some other call's message: the check
        return [(s.call, s.evicted) for s in t.expire()]

    assert not tick(HOUR - 1)
    assert sorted(tick(SCAN_S)) == [(1, "idle"), (4, "idle")]
    assert {c.call for c in t.calls()} == {2, 3, 99}
    for _ in range(22):  # call 99 keeps signaling; 2 and 3 stay silent
        assert not tick(HOUR)
    assert sorted(tick(HOUR)) == [(2, "idle"), (3, "idle")]
    assert [c.call for c in t.calls()] == [99]


def test_a_call_that_signals_is_never_idle():
    clock = Clock()
    t = CallTracker(CallLimits(idle_s=HOUR), clock)
    for _ in range(100):
        clock.t += HOUR - 1
        t.signaling(1, True, sig({"type": "alert"}))
        assert not t.expire()
    assert t.get(1) is not None


def test_expiry_zero_means_never_and_the_scan_is_amortised():
    clock = Clock()
    t = CallTracker(CallLimits(idle_s=0, connected_idle_s=0), clock)
    t.signaling(1, True, sig({"type": "setup"}))
    clock.t += 1e9
    t.signaling(2, True, sig({"type": "setup"}))
    assert not t.expire() and len(t) == 2

    t = CallTracker(CallLimits(idle_s=HOUR), clock)
    t.signaling(1, True, sig({"type": "setup"}))
    assert not t.expire()  # a scan
    clock.t += HOUR - 30
    t.signaling(2, True, sig({"type": "setup"}))
    assert not t.expire()  # a scan: call 1 silent for less than an hour
    clock.t += 40
    t.signaling(2, True, sig({"type": "alert"}))
    assert not t.expire()  # call 1 is idle now, but the last scan was 40 s ago
    clock.t += SCAN_S - 40
    t.signaling(2, True, sig({"type": "call_proc"}))
    assert [s.call for s in t.expire()] == [1]


def test_released_calls_and_release_all_leave_nothing_behind():
    t = CallTracker()
    for c in range(1000):
        t.signaling(c, True, sig({"type": "setup"}))
        t.signaling(c, True, sig({"type": "rel"}))
    assert len(t) == 0 and not t._seen
    for c in range(50):
        t.signaling(c, True, sig({"type": "setup"}))
    t.forget(3)
    assert len(t._seen) == 49
    t.release_all()
    assert not t._calls and not t._seen


OPS = st.lists(st.tuples(
    st.sampled_from(["setup", "setup_ack", "alert", "conn", "disc", "rel", "info", "facility", "sync"]),
    st.integers(-3, 40),            # call ids
    st.booleans(),                  # direction
    st.sampled_from([0.0, 1.0, 30.0, 600.0, 4000.0]),  # seconds before the message
    st.integers(0, 300),            # digits/characters sent
), max_size=300)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_a_consumer_following_the_events_sees_exactly_the_tracked_calls(ops):
    """Whatever the PBX sends: at most max_calls are tracked, every string within its bound,
    and the calls a consumer believes open (from the events alone) are the ones tracked: an
    evicted call is announced, never silently forgotten."""
    clock = Clock()
    t = CallTracker(CallLimits(max_calls=8, idle_s=1800, connected_idle_s=7200), clock)
    open_calls: dict[int, object] = {}
    for kind, call, to, dt, n in ops:
        clock.t += dt
        text = "9" * n
        if kind == "sync":
            out = [t.sync(sync(call, {"state": "alert", "remote": {"num": text, "dn": text}}))]
        else:
            s = {"type": kind, "cg": {"num": text, "sip": text}, "cd": {"num": text},
                 "fty": [{"type": "name_identification", "name": text}]}
            out = [t.signaling(call, to, sig(s))]
        out += t.expire()
        for status in out:
            if status is None:
                continue
            r = status.remote
            assert len(r.num or "") <= MAX_NUM and len(r.sip or "") <= MAX_TEXT and len(r.dn or "") <= MAX_TEXT
            if status.state is CallState.RELEASED:
                open_calls.pop(status.call, None)
            else:
                open_calls[status.call] = status
        assert len(t) <= 8
        assert set(open_calls) == {c.call for c in t.calls()}
        assert all(open_calls[c.call] == c for c in t.calls())


# ------------------------------------------------------------------------------- the device
def test_device_publishes_evictions_and_drops_their_trace_contexts():
    clock = Clock()
    d = Device(HW, EventFactory("i"), CallLimits(max_calls=5, idle_s=HOUR), clock)
    contexts = tracing.contexts(d)  # what tracing keeps per call
    bodies = []
    for c in range(1, 21):
        contexts.set(c, object())
        bodies += [json.loads(o.body) for o in d.on_frame(signaling(c, {"type": "setup"}))]
    evicted = [b for b in bodies if b.get("evicted")]
    assert [b["call"] for b in evicted] == list(range(1, 16))
    assert all(b["state"] == "released" and b["evicted"] == "too-many-calls" and b["cause"] is None
               for b in evicted)
    assert "evicted" not in next(b for b in bodies if b["type"] == "call.state")  # absent otherwise
    assert len(d.tracker) == 5 and set(contexts) == set(range(16, 21))
    clock.t += 2 * HOUR
    out = [json.loads(o.body) for o in d.on_frame(signaling(99, {"type": "alert"}))]
    # the idle ones go first (so the new call needs no room made by the cap)
    assert sorted(b["call"] for b in out if b.get("evicted") == "idle") == list(range(16, 21))
    assert not [b for b in out if b.get("evicted") == "too-many-calls"]
    assert [c.call for c in d.tracker.calls()] == [99]


def test_device_keeps_no_trace_context_of_calls_it_cannot_track():
    d = Device(HW, EventFactory("i"), CallLimits(max_calls=10))
    contexts = tracing.contexts(d)
    for c in range(10_000):
        contexts.set(c, object())
        d.on_frame(signaling(c, {"type": 5}))  # a sig the tracker does not understand
        assert len(contexts) <= 2 * 10
    assert d.bad_sig == 10_000 and len(d.tracker) == 0
    assert len(contexts) <= 2 * 10


def test_trace_contexts_end_with_their_calls_and_their_device():
    d = Device(HW, EventFactory("i"), CallLimits(max_calls=5))
    contexts = tracing.contexts(d)
    assert tracing.contexts(d) is contexts and d.watcher is contexts
    for c in (1, 2, 3):
        contexts.set(c, object())
        d.on_frame(signaling(c, {"type": "setup"}))
    d.on_frame(signaling(1, {"type": "rel"}))  # released: its context goes
    assert set(contexts) == {2, 3}
    contexts.set(9, object())  # a call never tracked
    d.on_frame(m.Detached())  # every call ends
    assert len(contexts) == 0
    gone = weakref.ref(d)
    del d, contexts
    gc.collect()
    assert gone() is None  # tracing's contexts do not keep a device alive


def test_device_settle_after_eviction_is_quiet():
    d = Device(HW, EventFactory("i"), CallLimits(max_calls=2))
    for c in (1, 2, 3):
        d.on_frame(signaling(c, {"type": "setup"}))
    d.on_lost("session-lost")
    assert d.settle() and len(d.tracker) == 0  # 2 and 3 released; 1 had gone already


def test_attach_result_fields_are_bounded():
    big = "E" * 200_000
    d = Device(HW, EventFactory("i"))
    (out,) = d.on_frame(m.AttachResult(src=HW, err=big))
    body = json.loads(out.body)
    assert len(body["error"]) == MAX_ATTACH_TEXT and body["error"].endswith(CUT)
    assert len(d.result.err) == MAX_ATTACH_TEXT
    d = Device(HW, EventFactory("i"))
    (out,) = d.on_frame(m.AttachResult(src=HW, err={"list": list(range(100_000))}))
    assert len(json.loads(out.body)["error"]) == MAX_ATTACH_TEXT
    d = Device(HW, EventFactory("i"))
    d.on_frame(m.AttachResult(src=HW, stun=";".join(["s"] * 100_000), country="49", maxIntern=[0] * 100_000))
    (out,) = d.on_frame(m.Attached(src=HW))
    attach = json.loads(out.body)["attach"]
    assert len(";".join(attach["stun"])) <= MAX_ATTACH_TEXT and attach["country"] == "49"
    assert len(attach["maxIntern"]) == MAX_ATTACH_TEXT
    small = m.AttachResult(src=HW, stun="a;b", maxIntern=4)
    d.on_frame(small)
    assert d.result is small  # nothing to cut: kept as it came


# ------------------------------------------------------------------------------- logs
def _logger(secrets=(), fmt=None):
    out = io.StringIO()
    h = logging.StreamHandler(out)
    h.setFormatter(fmt or JsonFormatter())
    h.addFilter(RedactSecrets(list(secrets)))
    h.addFilter(BoundLength())
    log = logging.getLogger(f"bounds{id(out)}")
    log.handlers[:] = [h]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log, out


def test_a_200kB_argument_makes_a_short_line_and_the_rest_of_the_message_stays():
    log, out = _logger()
    log.warning("device %s: attach refused by the PBX: %s; retry in %.1fs", HW, "E" * 200_000, 2.5)
    rec = json.loads(out.getvalue())
    assert len(out.getvalue()) < MAX_ARG_CHARS + 300
    assert rec["msg"].startswith(f"device {HW}: attach refused by the PBX: EEE")
    assert f"…({200_000 - MAX_ARG_CHARS} chars cut); retry in 2.5s" in rec["msg"]


def test_any_long_message_argument_extra_or_traceback_is_cut():
    log, out = _logger(fmt=logging.Formatter("%(levelname)s %(message)s"))
    log.info("x" * 300_000)
    log.info("%s", [0] * 100_000)  # an argument that is not a string
    log.info("%s " * 10, *(["y" * 900] * 10))  # many arguments under the bound, the sum over it
    try:
        raise ValueError("z" * 100_000 + "THE END")
    except ValueError:
        log.exception("failed")
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) < MAX_EXC_CHARS + 100
    assert lines[0].endswith(f"…({300_000 - MAX_MSG_CHARS} chars cut)") and len(lines[0]) < MAX_MSG_CHARS + 40
    assert "chars cut" in lines[1] and "chars cut" in lines[2]
    tb = out.getvalue().split("failed\n", 1)[1]
    assert tb.startswith("Traceback") and tb.rstrip().endswith("THE END") and "chars cut" in tb

    log, out = _logger()
    log.info("x", extra={"peer": "p" * 50_000})
    assert len(json.loads(out.getvalue())["peer"]) < MAX_ARG_CHARS + 30


def test_secrets_are_masked_before_the_cut():
    secret = "s3cr3t-pw-XYZ"
    log, out = _logger([secret])
    log.warning("login: %s", "a" * (MAX_ARG_CHARS - 5) + secret + "b" * 10_000)  # straddles the cut
    text = out.getvalue()
    assert "s3cr3" not in text and "***" in text


@pytest.mark.parametrize("secrets", [[], ["s3cr3t-pw"]])
def test_a_log_call_whose_arguments_do_not_fit_neither_raises_nor_writes_them(secrets):
    log, out = _logger(secrets)
    log.warning("attach of %s took %d ms", HW, "s3cr3t-pw" + "x" * 100_000)  # raised before
    rec = json.loads(out.getvalue())
    assert rec["msg"].startswith("attach of %s took %d ms (arguments not formatted: TypeError")
    assert "s3cr3t" not in out.getvalue() and len(out.getvalue()) < 500


def test_short_lines_are_untouched():
    log, out = _logger()
    log.info("session %s attached in %d ms", HW, 12)
    assert json.loads(out.getvalue())["msg"] == f"session {HW} attached in 12 ms"


# ------------------------------------------------------------------------------- settings
def test_call_limits_come_from_the_environment():
    s = Settings.from_env({"EPSIGNAL_MAX_CALLS_PER_DEVICE": "1000", "EPSIGNAL_CALL_IDLE_S": "600",
                           "EPSIGNAL_CONNECTED_CALL_IDLE_S": "0"})
    assert s.call_limits() == CallLimits(max_calls=1000, idle_s=600.0, connected_idle_s=0.0)
    assert Settings.from_env({}).call_limits() == CallLimits()
    with pytest.raises(ValueError, match="EPSIGNAL_MAX_CALLS_PER_DEVICE"):
        Settings.from_env({"EPSIGNAL_MAX_CALLS_PER_DEVICE": "0"})
    with pytest.raises(ValueError, match="EPSIGNAL_CALL_IDLE_S"):
        Settings.from_env({"EPSIGNAL_CALL_IDLE_S": "-1"})


def test_the_evicted_marker_is_in_the_event_contract():
    f = EventFactory("i")
    from bridge.protocol.callstate import CallStatus

    body = json.loads(f.call_state(HW, CallStatus(call=1, state=CallState.RELEASED, evicted="idle")).body)
    assert body["evicted"] == "idle" and body["state"] == "released"
    assert "evicted" not in json.loads(f.call_state(HW, CallStatus(call=1, state=CallState.SETUP)).body)
    assert msgspec.json.decode(json.dumps(body).encode(), type=__import__("bridge.events").events.CallStateChanged)
