"""What the simulated PBX does with each frame an application sends.

Login (inbound sessions), Attach, and Signaling: a forward of a message waiting in the path, a
message the application injects into a running call, or the setup of a call the application
starts (negative id). One decode per frame, O(1) work per message, nothing logged.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from msgspec import UNSET

from bridge.protocol.errors import FrameError
from bridge.protocol.messages import (
    AppChallenge,
    AppLogin,
    Attach,
    AttachResult,
    CallState,
    Remote,
    Signaling,
    decode,
    encode,
)
from bridge.protocol.signal import Sig
from bridge.sim import calls as _calls
from bridge.sim.calls import Call
from bridge.sim.devices import Device, remote_dn, remote_sip

if TYPE_CHECKING:
    from bridge.sim.pbx import PbxSimulator
    from bridge.sim.session import Session

NOT_LOGGED_IN = 1008


def on_frame(pbx: PbxSimulator, s: Session, data: str | bytes) -> None:
    """One frame from the application (str: a text frame, bytes: a binary one). A bad frame is
    counted and otherwise ignored."""
    try:
        msg = decode(data)
    except FrameError:
        pbx.counters.bad_frames += 1
        return
    t = type(msg)
    if t is Signaling:
        if not s.logged_in:
            s.close_after_flush(NOT_LOGGED_IN, "not logged in")
            return
        on_signaling(pbx, s, msg)
    elif t is Attach:
        if not s.logged_in:
            s.close_after_flush(NOT_LOGGED_IN, "not logged in")
            return
        on_attach(pbx, s, msg)
    elif t is AppChallenge and s.login is not None:
        s.post(encode(s.login.on_challenge_request(msg)))
    elif t is AppLogin and s.login is not None:
        on_login(pbx, s, msg)
    else:  # a PBX-to-application message type, or a login on an outbound session
        pbx.counters.bad_frames += 1


def on_login(pbx: PbxSimulator, s: Session, msg: AppLogin) -> None:
    result = s.login.on_login(msg)
    if result.ok and pbx.faults.refuse_logins:
        result.ok = False
    s.post(encode(result))
    if result.ok:
        s.logged_in = True
        pbx.counters.logins_ok += 1
    else:
        s.logged_in = False
        pbx.counters.logins_failed += 1
        s.close_after_flush(NOT_LOGGED_IN, "login failed")


def on_attach(pbx: PbxSimulator, s: Session, msg: Attach) -> None:
    src = msg.src
    d = pbx.devices.get(msg.hw)
    if d is None:
        s.post(encode(AttachResult(src=src, err="unknown device")))
        return
    if d.session is not None and d.session is not s:
        pbx.counters.attach_conflicts += 1
        pbx.conflict_hw.append(d.hw)
        s.post(encode(AttachResult(src=src, err="already attached")))
        return
    if d.session is s and d.src is not UNSET and s.by_src.get(d.src) is d:
        del s.by_src[d.src]  # attached again by the same session, maybe with another src
    d.session = s
    d.src = src
    s.devices[d.hw] = d
    if src is not UNSET:
        s.by_src[src] = d
    s.post(encode(AttachResult(
        src=src, stun="stun1.example.net;stun2.example.net", turn="turn.example.net:3478",
        turnUsr="sim", turnPwd=secrets.token_urlsafe(12), prefixIntl="000", prefixNtl="00",
        prefixSubs="0", area="7031", country="49", maxIntern=4, tones=1,
    )))
    if d.registered:
        pbx._announce(d)


def on_signaling(pbx: PbxSimulator, s: Session, msg: Signaling) -> None:
    cid = msg.call
    to = msg.to is True
    counters = pbx.counters
    if cid > 0:
        call = pbx._calls.get(cid)
        if call is None:
            if cid <= pbx._last_id:
                counters.late_signaling += 1  # the call has ended (e.g. a forwarded rel 102)
            else:
                counters.bad_signaling += 1
            return
        if call.device.session is not s:
            counters.bad_signaling += 1
            return
        if call.forwarded(to, msg.sig):
            counters.messages_forwarded += 1
        else:
            _inject(pbx, call, to, msg)
        return
    d = _app_device(s, msg.src)
    if d is None:
        counters.bad_signaling += 1
        return
    call = d.calls.get(cid)
    if call is not None:
        _inject(pbx, call, to, msg)
        return
    try:
        sig = msg.signal
    except FrameError:
        counters.bad_signaling += 1
        return
    if cid == 0 or sig.type != "setup":
        counters.bad_signaling += 1
        return
    _start_app_call(pbx, s, d, cid, to, sig, bytes(msg.sig))


def _inject(pbx: PbxSimulator, call: Call, to: bool, msg: Signaling) -> None:
    try:
        kind = msg.signal.type
    except FrameError:
        pbx.counters.bad_signaling += 1
        return
    pbx.counters.messages_injected += 1
    call.delivered.append((to, bytes(msg.sig)))
    call.inject(to, kind)


def _app_device(s: Session, src) -> Device | None:
    """The device a call of the application is for: by the Attach's src, or the only one."""
    if src is not UNSET:
        d = s.by_src.get(src)
        if d is not None:
            return d
    if len(s.devices) == 1:
        return next(iter(s.devices.values()))
    return None


def _start_app_call(
    pbx: PbxSimulator, s: Session, d: Device, cid: int, to: bool, sig: Sig, raw: bytes,
) -> None:
    party = sig.cg if to else sig.cd  # the remote party: the caller toward the device
    num = party.num if party is not UNSET and party.num is not UNSET else None
    if party is not UNSET and party.sip is not UNSET:
        sip = party.sip
    else:
        sip = remote_sip(num) if num else None
    remote = Remote(num=num, sip=sip, dn=remote_dn(num) if num else None)
    call = Call(pbx, cid, d, incoming=to, remote=remote, app_session=s, app_src=d.src)
    call.set_state(CallState.SETUP)
    call.delivered.append((to, raw))
    pbx.counters.app_calls += 1
    pbx._begin(call, _calls.app_toward_device if to else _calls.app_toward_pbx)
