"""What the simulated PBX does with each frame an application sends.

Login (inbound sessions), Attach, and Signaling: a forward of a message waiting in the path, a
message the application injects into a running call, or the setup of a call the application
starts (negative id). One decode per frame, O(1) work per message, nothing logged.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

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
from bridge.protocol.login import ServerLogin
from bridge.protocol.signal import Sig
from bridge.sim import calls as _calls
from bridge.sim.calls import Call, CallHost
from bridge.sim.config import remote_dn, remote_sip
from bridge.sim.devices import Device
from bridge.sim.faults import Faults
from bridge.sim.stats import Counters

NOT_LOGGED_IN = 1008


class AppSession(Protocol):
    """What the dispatch needs of an application session (:class:`bridge.sim.session.Session`)."""

    #: the application logged in (an outbound session: from the start)
    logged_in: bool
    #: the login's server side (None: an outbound session, the application is the server)
    login: ServerLogin | None
    #: devices attached on this session, by hw; and by the Attach's src
    devices: dict[str, Device]
    by_src: dict[str, Device]

    def post(self, frame: bytes) -> None: ...

    def close_after_flush(self, code: int = 1008, reason: str = "") -> None: ...


class Switch(CallHost, Protocol):
    """What the dispatch needs of the simulator (:class:`bridge.sim.pbx.PbxSimulator`)."""

    counters: Counters
    faults: Faults
    devices: dict[str, Device]
    conflict_hw: list[str]

    @property
    def last_call_id(self) -> int: ...

    def call(self, call_id: int) -> Call | None: ...

    def announce(self, d: Device) -> None: ...

    def begin(self, call: Call, script: Callable[[Call], Coroutine[Any, Any, None]]) -> None: ...


def on_frame(pbx: Switch, s: AppSession, data: str | bytes) -> None:
    """One frame from the application (str: a text frame, bytes: a binary one). A bad frame is
    counted and otherwise ignored."""
    try:
        msg = decode(data)
    except FrameError:
        pbx.counters.bad_frames += 1
        return
    if type(msg) is Signaling:
        if not s.logged_in:
            s.close_after_flush(NOT_LOGGED_IN, "not logged in")
            return
        on_signaling(pbx, s, msg)
    elif type(msg) is Attach:
        if not s.logged_in:
            s.close_after_flush(NOT_LOGGED_IN, "not logged in")
            return
        on_attach(pbx, s, msg)
    elif type(msg) is AppChallenge and s.login is not None:
        s.post(encode(s.login.on_challenge_request(msg)))
    elif type(msg) is AppLogin and s.login is not None:
        on_login(pbx, s, msg)
    else:  # a PBX-to-application message type, or a login on an outbound session
        pbx.counters.bad_frames += 1


def on_login(pbx: Switch, s: AppSession, msg: AppLogin) -> None:
    assert s.login is not None  # on_frame takes a login on an inbound session only
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


def on_attach(pbx: Switch, s: AppSession, msg: Attach) -> None:
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
        pbx.announce(d)


def on_signaling(pbx: Switch, s: AppSession, msg: Signaling) -> None:
    cid = msg.call
    to = msg.to is True
    counters = pbx.counters
    if cid > 0:
        call = pbx.call(cid)
        if call is None:
            if cid <= pbx.last_call_id:
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


def _inject(pbx: Switch, call: Call, to: bool, msg: Signaling) -> None:
    try:
        kind = msg.signal.type
    except FrameError:
        pbx.counters.bad_signaling += 1
        return
    pbx.counters.messages_injected += 1
    call.delivered.append((to, bytes(msg.sig)))
    call.inject(to, kind)


def _app_device(s: AppSession, src) -> Device | None:
    """The device a call of the application is for: by the Attach's src, or the only one."""
    if src is not UNSET:
        d = s.by_src.get(src)
        if d is not None:
            return d
    if len(s.devices) == 1:
        return next(iter(s.devices.values()))
    return None


def _start_app_call(
    pbx: Switch, s: AppSession, d: Device, cid: int, to: bool, sig: Sig, raw: bytes,
) -> None:
    party = sig.cg if to else sig.cd  # the remote party: the caller toward the device
    num = party.num if party is not UNSET and party.num is not UNSET else None
    sip: str | None
    if party is not UNSET and party.sip is not UNSET:
        sip = party.sip
    else:
        sip = remote_sip(num) if num else None
    remote = Remote(num=num, sip=sip, dn=remote_dn(num) if num else None)
    call = Call(pbx, cid, d, incoming=to, remote=remote, app_session=s, app_src=d.src)
    call.set_state(CallState.SETUP)
    call.delivered.append((to, raw))
    pbx.counters.app_calls += 1
    pbx.begin(call, _calls.app_toward_device if to else _calls.app_toward_pbx)
