"""Scenario 6: the msgspec path against the standard library's ``json``, per message.

Both paths do the same work for one Signaling frame of the call cycle (:mod:`bridge.bench.frames`):
decode the frame, update the call state of the device, and encode the events it makes
(``call.signaling`` always, ``call.state`` when the state changed), ready to publish
(:class:`~bridge.events.Outgoing` with key, body, message id, timestamp).

- **msgspec**: exactly the bridge's code: ``messages.decode`` then ``Device.on_frame``
  (``CallTracker`` on the typed ``sig``, ``EventFactory`` encoding Structs; ``sig`` stays raw).
- **stdlib**: ``json.loads`` into dicts, the same tracker rules on dicts (:class:`DictTracker`),
  the event dicts encoded with ``json.dumps`` (the ``sig`` is re-encoded: with ``json`` there is
  no way to pass it through byte for byte). It validates nothing, so it is a lower bound of what
  a stdlib bridge would cost.

:func:`equivalent` checks that both make the same events (same JSON values apart from ``time``),
so the comparison is like for like.
"""

from __future__ import annotations

import gc
import json
import time
from datetime import datetime, UTC

from bridge import routing
from bridge.bench.frames import sample_frames
from bridge.device import Device
from bridge.events import KINDS, EventFactory, Outgoing
from bridge.protocol import messages as m

INSTANCE = "bench-codec"
_BY_TYPE = {"setup": "setup", "setup_ack": "setup-ack", "call_proc": "call-proc", "alert": "alert",
            "conn": "connected"}


def _merge_party(remote: dict, party, append: bool = False) -> dict:
    if not party:
        return remote
    num, sip = remote.get("num"), remote.get("sip")
    if "num" in party:
        num = (num or "") + party["num"] if append else party["num"]
    if "sip" in party:
        sip = party["sip"]
    out = dict(remote)
    out["num"], out["sip"] = num, sip
    return {k: v for k, v in out.items() if v is not None}


class DictTracker:
    """:class:`bridge.protocol.callstate.CallTracker`'s rules on plain dicts."""

    def __init__(self) -> None:
        self.calls: dict[int, dict] = {}

    def signaling(self, call: int, to: bool, sig: dict) -> dict | None:
        old = self.calls.get(call)
        t = sig["type"]
        if t == "setup" or old is None:
            cur = {"call": call, "state": "setup" if t == "setup" else "null",
                   "in": to if t == "setup" else None, "remote": {}, "channel": None, "held": False,
                   "app": call < 0, "cause": None}
        else:
            cur = old
        new = self._apply(cur, to, sig)
        if new["state"] == "released":
            self.calls.pop(call, None)
        else:
            self.calls[call] = new
        return None if new == old else new

    @staticmethod
    def _apply(cur: dict, to: bool, sig: dict) -> dict:
        t = sig["type"]
        changes: dict = {}
        state = _BY_TYPE.get(t)
        if t == "disc":
            state = "disconnected" if to else "disconnecting"
        elif t == "rel":
            state = "released"
        if state is not None and state != cur["state"]:
            changes["state"] = state
        cau = sig.get("cau")
        if cau is not None and t in ("disc", "rel"):
            changes["cause"] = {k: cau[k] for k in ("num", "loc") if cau.get(k) is not None}
        if "channel" in sig:
            changes["channel"] = sig["channel"]
        remote = cur["remote"]
        incoming = cur["in"] if cur["in"] is not None else to
        party = sig.get("cg") if incoming else sig.get("cd")
        if t == "info" and not incoming and cur["state"] in ("setup", "setup-ack"):
            remote = _merge_party(remote, sig.get("cd"), append=True)
        elif t != "info":
            remote = _merge_party(remote, party)
        for f in sig.get("fty") or ():
            ft = f.get("type")
            if ft == "name_identification" and "name" in f and to:
                remote = {**remote, "dn": f["name"]}
            elif ft == "hold_notify":
                changes["held"] = True
            elif ft == "retrieve_notify":
                changes["held"] = False
            elif ft == "cp_park":
                changes["state"] = "parked"
        if remote != cur["remote"]:
            changes["remote"] = remote
        return {**cur, **changes} if changes else cur


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
