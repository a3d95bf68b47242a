"""Scenario 6: the msgspec path against the standard library's ``json``, per message.

Both paths do the same work for one Signaling frame of the call cycle (:mod:`bridge.bench.frames`):
decode the frame, update the call state of the device, and encode the events it makes
(``call.signaling`` always, ``call.state`` when the state changed), ready to publish
(:class:`~bridge.events.Outgoing` with key, body, message id, timestamp).

- **msgspec**: exactly the bridge's code: ``messages.decode`` then ``Device.on_frame``
  (``CallTracker`` on the typed ``sig``, ``EventFactory`` encoding Structs; ``sig`` stays raw).
- **stdlib**: ``json.loads`` into dicts, the core's tracker rules (:class:`DictTracker`: the
  ``CallTracker`` fed a ``Sig`` built from the dicts, its status turned into dicts), the event
  dicts encoded with ``json.dumps`` (the ``sig`` is re-encoded: with ``json`` there is no way to
  pass it through byte for byte). It validates nothing, so it is a lower bound of what a stdlib
  bridge would cost.

:func:`equivalent` checks that both make the same events (same JSON values apart from ``time``),
so the comparison is like for like.
"""

from __future__ import annotations

import gc
import json
import time
from datetime import datetime, UTC

from msgspec import UNSET, UnsetType

from bridge import routing
from bridge.bench.frames import sample_frames
from bridge.device import Device
from bridge.events import KINDS, EventFactory, Outgoing
from bridge.protocol import messages as m
from bridge.protocol.callstate import CallStatus, CallTracker
from bridge.protocol.signal import Cause, Facility, Party, Sig

INSTANCE = "bench-codec"


def _party(d: dict | None) -> Party | UnsetType:
    return UNSET if d is None else Party(num=d.get("num", UNSET), sip=d.get("sip", UNSET))


def _sig(d: dict) -> Sig:
    """The typed view the tracker reads, built from ``json.loads``' dicts (not validated)."""
    cau, fty = d.get("cau"), d.get("fty")
    return Sig(type=d["type"], cg=_party(d.get("cg")), cd=_party(d.get("cd")),
               cau=UNSET if cau is None else Cause(num=cau.get("num"), loc=cau.get("loc")),
               channel=d.get("channel", UNSET),
               fty=UNSET if fty is None else [Facility(type=f.get("type"), name=f.get("name", UNSET)) for f in fty])


def _status(st: CallStatus) -> dict:
    """A call's status as the dicts of a ``call.state`` event."""
    r, c = st.remote, st.cause
    return {"call": st.call, "state": st.state.value, "in": st.in_,
            "remote": {k: v for k, v in (("num", r.num), ("sip", r.sip), ("dn", r.dn)) if v is not None},
            "channel": st.channel, "held": st.held, "app": st.app,
            "cause": None if c is None else {k: v for k, v in (("num", c.num), ("loc", c.loc)) if v is not None}}


class DictTracker:
    """The core's call-state rules (:class:`~bridge.protocol.callstate.CallTracker`) for a sig
    read into dicts: in a dict, out a dict (or None: nothing changed)."""

    def __init__(self) -> None:
        self._tracker = CallTracker()

    @property
    def calls(self) -> dict[int, dict]:
        return {st.call: _status(st) for st in self._tracker.calls()}

    def signaling(self, call: int, to: bool, sig: dict) -> dict | None:
        st = self._tracker.signaling(call, to, _sig(sig))
        return None if st is None else _status(st)


class DictDevice:
    """The stdlib twin of :class:`bridge.device.Device` for Signaling frames."""

    def __init__(self, hw: str, instance: str = INSTANCE) -> None:
        self.hw = hw
        self.instance = instance
        self.seq = 0
        self.tracker = DictTracker()

    def _out(self, typ: str, key: str, fields: dict) -> Outgoing:
        self.seq += 1
        now = datetime.now(UTC)
        ev = {"type": typ, "v": 1, "hw": self.hw, "seq": self.seq, "instance": self.instance,
              "time": now.isoformat().replace("+00:00", "Z"), **fields}
        body = json.dumps(ev, separators=(",", ":"), ensure_ascii=False).encode()
        return Outgoing(key=key, body=body, type=typ, message_id=f"{self.instance}/{self.hw}/{self.seq}",
                        timestamp=now, hw=self.hw, seq=self.seq)

    def on_frame(self, frame: bytes) -> list[Outgoing]:
        d = json.loads(frame)
        if d.get("mt") != "Signaling":
            return []
        call, to, sig = d["call"], d.get("to") is True, d["sig"]
        out = [self._out("call.signaling", routing.call_key(self.hw, call, "signaling"),
                         {"call": call, "to": to, "origin": "pbx", "sig": sig})]
        st = self.tracker.signaling(call, to, sig)
        if st is not None:
            fields = {"call": st["call"], "state": st["state"], "in": st["in"], "remote": st["remote"],
                      "channel": st["channel"], "held": st["held"], "app": st["app"],
                      "cause": st["cause"], "sync": False}
            out.append(self._out("call.state", routing.call_key(self.hw, call, "state"), fields))
        return out


def _msgspec_path(frames: list[bytes], devices: int, kinds: tuple[str, ...] = KINDS):
    devs = [Device(_hw(frames[i]), EventFactory(INSTANCE, kinds)) for i in range(devices)]
    decode = m.decode

    def run() -> int:
        n = 0
        for i, f in enumerate(frames):
            n += len(devs[i % devices].on_frame(decode(f)))
        return n
    return run


def _stdlib_path(frames: list[bytes], devices: int):
    devs = [DictDevice(_hw(frames[i])) for i in range(devices)]

    def run() -> int:
        n = 0
        for i, f in enumerate(frames):
            n += len(devs[i % devices].on_frame(f))
        return n
    return run


def _hw(frame: bytes) -> str:
    return json.loads(frame)["src"]


def equivalent(devices: int = 3, calls: int = 4) -> bool:
    """Both paths make the same events from the same frames (``time`` aside)."""
    frames = sample_frames(devices, calls)
    a = [Device(_hw(frames[i]), EventFactory(INSTANCE)) for i in range(devices)]
    b = [DictDevice(_hw(frames[i])) for i in range(devices)]
    for i, f in enumerate(frames):
        ea = a[i % devices].on_frame(m.decode(f))
        eb = b[i % devices].on_frame(f)
        if len(ea) != len(eb):
            return False
        for x, y in zip(ea, eb, strict=True):
            jx, jy = json.loads(x.body), json.loads(y.body)
            jx.pop("time"), jy.pop("time")
            if (jx, x.key, x.type, x.message_id) != (jy, y.key, y.type, y.message_id):
                return False
    return True


def _time(fn, repeats: int) -> float:
    """Best-of-``repeats`` seconds of one call of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(messages: int = 20_000, repeats: int = 5) -> dict:
    """ns per message of decode only and of decode + state + encode, for both paths."""
    devices = 10
    calls = max(1, messages // (devices * 5))
    frames = sample_frames(devices, calls)
    n = len(frames)
    ms_full, std_full = _msgspec_path(frames, devices), _stdlib_path(frames, devices)
    # EPSIGNAL_EVENT_KINDS=call.state: no call.signaling event per frame
    ms_states = _msgspec_path(frames, devices, ("call.state",))
    ms_full(), std_full(), ms_states()  # warm up (the trackers end every call: state starts empty again)

    def ms_decode():
        for f in frames:
            m.decode(f)

    def std_decode():
        for f in frames:
            json.loads(f)

    gc.collect()
    res = {
        "messages": n,
        "frame_bytes_mean": round(sum(map(len, frames)) / n, 1),
        "events_per_message": round(ms_full() / n, 3),
        "equivalent_events": equivalent(),
    }
    for name, fn in (("msgspec_decode", ms_decode), ("stdlib_decode", std_decode),
                     ("msgspec_full", ms_full), ("stdlib_full", std_full),
                     ("msgspec_states_only", ms_states)):
        res[f"{name}_us"] = round(_time(fn, repeats) / n * 1e6, 3)
    res["speedup_full"] = round(res["stdlib_full_us"] / res["msgspec_full_us"], 2)
    res["states_only_saving_pct"] = round(100 * (1 - res["msgspec_states_only_us"] / res["msgspec_full_us"]), 1)
    res["speedup_decode"] = round(res["stdlib_decode_us"] / res["msgspec_decode_us"], 2)
    return res
