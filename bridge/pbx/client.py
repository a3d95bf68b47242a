"""Client mode: one AppWebsocket session per attached device, kept up with backoff.

Each :class:`DeviceRunner` connects to the PBX, logs in, sends Attach, and reads. When the
session drops it reconnects with exponential backoff and jitter, logs in again and attaches
again; the ``Sync`` that follows republishes the state of every call. A refused login is not a
network fault: it is retried after ``login_retry_s`` (60 s by default), never in a tight loop.
An ``AttachResult`` with ``err`` ends the runner: the PBX does not know the device. The pauses
are the policies of :mod:`bridge.backoff`.

Detach is ending the session (EpSignal has no Detach message). :class:`ClientPbx` keeps the
runners: the client mode's side of :class:`bridge.pbx.mode.Pbx`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import cast

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from bridge import backoff
from bridge.config import Settings
from bridge.device import Device, bounded_result
from bridge.pbx.mode import AttachFailed
from bridge.pbx.connection import PbxClientConnection, ws_max_size
from bridge.pbx.session import SETTLE_S, Emit, PbxSession, login_as_client
from bridge.tls import client_context
from bridge.protocol import messages as m
from bridge.protocol.errors import FrameError
from bridge.protocol.login import LoginFailed

log = logging.getLogger("bridge.pbx")

#: ``DeviceRunner.stop`` waits at most this long for the runner's task to end
STOP_TIMEOUT_S = 5.0

RETRYABLE = (OSError, TimeoutError, ConnectionError, ConnectionClosed, InvalidHandshake, FrameError,
             LoginFailed)


class AttachRefused(Exception):
    """The PBX answered the Attach with ``err``."""


class DeviceRunner:
    """One device's AppWebsocket session in client mode: opened, attached, and opened again
    with backoff whenever it drops, until :meth:`stop`."""

    def __init__(self, settings: Settings, device: Device, emit: Emit, gate: asyncio.Semaphore,
                 ssl_context: ssl.SSLContext | None = None, refusals: int = 0, intercept=None) -> None:
        """``ssl_context``: for wss:// (one shared by all runners; see bridge.tls). ``refusals``:
        refused Attaches tried again (0.5 s, 1 s, 2 s, ... later) before the runner gives up;
        with leases, a new holder can be faster than the PBX at noticing the old one left."""
        self.s = settings
        self.device = device
        self.emit = emit
        self._gate = gate
        self._ssl = ssl_context
        self.session: PbxSession | None = None
        #: resolved with the first AttachResult (ok or not), or an exception
        self.first_result: asyncio.Future[m.AttachResult | None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task | None = None
        self.reconnects = 0
        self.login_failures = 0
        #: why the last try to open the session failed, as a sentence (None: it did not fail)
        self.last_error: str | None = None
        #: loop time the runner ended (attach refused, stopped)
        self.ended_at = 0.0
        self._refusals = refusals
        self._intercept = intercept
        self._stopping = False
        #: the WebSocket being opened (login, Attach): stop() closes it too
        self._ws: PbxClientConnection | None = None

    @property
    def hw(self) -> str:
        return self.device.hw

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"device {self.hw}")

    async def _open(self) -> PbxSession:
        s = self.s
        async with self._gate:  # bounded: thousands of attaches do not storm the PBX
            ws = cast(PbxClientConnection, await connect(
                s.pbx_url, compression=None, max_size=ws_max_size(s.max_frame_bytes), proxy=None,
                open_timeout=s.attach_timeout_s, ssl=self._ssl if s.pbx_url.startswith("wss:") else None,
                ping_interval=20, ping_timeout=20, close_timeout=2, create_connection=PbxClientConnection,
            ))
            self._ws = ws
            try:
                if self._stopping:
                    raise asyncio.CancelledError
                await login_as_client(ws, s.pbx_app, s.pbx_password, s.attach_timeout_s, s.max_frame_bytes)
                session = PbxSession(ws, self.emit, s.max_frame_bytes, self._intercept)
                session.reader = asyncio.create_task(session.run())
                result = await session.attach(self.device, s.attach_timeout_s)
            except BaseException:
                await ws.close()
                raise
            finally:
                self._ws = None
        if result.failed:
            await ws.close()
            raise AttachRefused(result.err)
        return session

    async def run(self) -> None:
        """One loop, one try per turn: open the session (log in, Attach), keep it until it
        drops, and pause before the next turn for as long as :mod:`bridge.backoff` says for
        what ended this one. Ends at :meth:`stop`, on a refused Attach (after ``refusals``
        tries), on a bad URL and on a bug."""
        s = self.s
        network = backoff.network(s)
        failures = 0  # tries in a row that failed (network faults, refused logins)
        refused = 0  # refused Attaches so far
        short_lived = 0  # sessions in a row that died young
        try:
            while not self._stopping:
                try:
                    self.session = await self._open()
                except RETRYABLE as e:
                    failures += 1
                    pause = (backoff.login_refused(s) if isinstance(e, LoginFailed)
                             else network(backoff.attempt(failures)))
                    self._retry_failed(e, pause)
                    await asyncio.sleep(pause)
                    continue
                except AttachRefused as e:
                    if refused >= self._refusals:
                        raise
                    refused += 1
                    failures = 0
                    log.info("device %s: attach refused by the PBX (%s); trying again", self.hw, e)
                    await asyncio.sleep(backoff.attach_refused(refused))
                    continue
                failures = 0
                self.last_error = None
                if self._stopping:  # stopped while logging in or attaching: never left attached
                    await self.session.close()
                    break
                lived = await self._hold(self.session)
                if self._stopping:
                    break
                self.reconnects += 1
                self._lost("session-lost")
                # a session that dies soon after it was made must not make a tight loop
                short_lived = short_lived + 1 if lived < s.reconnect_max_s else 0
                pause = backoff.short_lived(s, short_lived)
                log.warning("device %s: PBX session lost, reconnecting in %.1fs", self.hw, pause)
                await asyncio.sleep(pause)
        except AttachRefused as e:
            log.warning("device %s: attach refused by the PBX: %s", self.hw, e)
            if not self.first_result.done():
                self.first_result.set_result(self.device.result)
        except InvalidURI as e:
            log.error("device %s: bad EPSIGNAL_PBX_URL: %s", self.hw, e)
            if not self.first_result.done():
                self.first_result.set_exception(e)
        except asyncio.CancelledError:
            if not self.first_result.done():
                self.first_result.cancel()
            raise
        except Exception as e:  # a bug: say so, and let a waiting attach command know
            log.exception("device %s: runner failed", self.hw)
            if not self.first_result.done():
                self.first_result.set_exception(e)
        finally:
            self.ended_at = asyncio.get_running_loop().time()

    async def _hold(self, session: PbxSession) -> float:
        """The session is attached: say so, settle the Sync after :data:`SETTLE_S`, and wait
        until it closes. Returns how long it lived (seconds)."""
        log.info("device %s: PBX session open, attach accepted%s", self.hw,
                 f" (after {self.reconnects} reconnects)" if self.reconnects else "")
        if not self.first_result.done():
            self.first_result.set_result(self.device.result)
        loop = asyncio.get_running_loop()
        settle = loop.call_later(SETTLE_S, self._settle)
        started = loop.time()
        try:
            await session.closed
        finally:
            settle.cancel()
        return loop.time() - started

    def _settle(self) -> None:
        for ev in self.device.settle():
            self.emit(ev)

    def _lost(self, reason: str) -> None:
        for ev in self.device.on_lost(reason):
            self.emit(ev)

    def _retry_failed(self, exc: BaseException, pause: float) -> None:
        """A try to open the session failed with ``exc``; the next one is ``pause`` s away."""
        if isinstance(exc, LoginFailed):
            self.login_failures += 1
            self.last_error = f"{exc}; check EPSIGNAL_PBX_APP and EPSIGNAL_PBX_PASSWORD"
            log.error("device %s: %s; retry in %.0fs", self.hw, self.last_error, pause)
        elif isinstance(exc, ssl.SSLCertVerificationError):
            self.last_error = (f"the PBX's TLS certificate is not trusted (SSLCertVerificationError: {exc}); "
                               "set EPSIGNAL_PBX_CA_FILE to its CA bundle")
            log.error("device %s: %s; retry in %.1fs", self.hw, self.last_error, pause)
        else:
            self.last_error = f"PBX unreachable ({type(exc).__name__}: {exc})"
            log.warning("device %s: %s, retry in %.1fs", self.hw, self.last_error, pause)

    async def stop(self, reason: str | None = None, timeout: float = STOP_TIMEOUT_S) -> bool:
        """End the attachment (close the session) and the runner, within ``timeout``: a lease
        round or a hand-on waiting on it must not wait forever; then, with a ``reason``, emit
        the device's ``detached(reason)``. True if the runner ended."""
        self._stopping = True
        try:
            async with asyncio.timeout(timeout):
                if self.session is not None:
                    await self.session.close()
                if self._ws is not None:  # logging in or attaching
                    await self._ws.close()
                if self.task is not None and not self.task.done():
                    self.task.cancel()
                    try:
                        await self.task
                    except (asyncio.CancelledError, Exception):
                        me = asyncio.current_task()
                        if me is not None and me.cancelling():
                            raise
        except TimeoutError:
            log.error("device %s: runner did not stop within %.0fs", self.hw, timeout)
        if reason is not None:
            self._lost(reason)
        return self.task is None or self.task.done()


class ClientPbx:
    """Client mode (:class:`bridge.pbx.mode.Pbx`): a :class:`DeviceRunner` per device."""

    def __init__(self, settings: Settings, make_device: Callable[[str], Device], emit: Emit,
                 refusals: int = 0, autostart: bool = True, intercept=None) -> None:
        """``refusals``: see :class:`DeviceRunner`. ``autostart``: :meth:`start` runs every
        configured device (without leases; with them, the lease manager says which).
        ``intercept``: the intercept adapter the sessions hold messages for (None: off)."""
        self.s = settings
        self.runners: dict[str, DeviceRunner] = {}
        self._make_device = make_device
        self._emit = emit
        self._refusals = refusals
        self._autostart = autostart
        self.intercept = intercept
        self._gate = asyncio.Semaphore(settings.attach_concurrency)
        self._ssl = (client_context(settings.pbx_ca_file, settings.pbx_tls_verify)
                     if settings.pbx_url.startswith("wss:") else None)

    async def start(self) -> None:
        if self._autostart:
            for hw in self.s.device_list:
                self.run(hw)

    def run(self, hw: str) -> DeviceRunner:
        """``hw``'s runner, started if there is none or it ended."""
        r = self.runners.get(hw)
        if r is None or (r.task is not None and r.task.done()):
            r = DeviceRunner(self.s, self._make_device(hw), self._emit, self._gate, self._ssl,
                             refusals=self._refusals, intercept=self.intercept)
            self.runners[hw] = r
            r.start()
        return r

    def ended_within(self, hw: str, seconds: float) -> bool:
        """``hw``'s runner ended (attach refused) less than ``seconds`` ago."""
        r = self.runners.get(hw)
        return (r is not None and r.task is not None and r.task.done()
                and asyncio.get_running_loop().time() - r.ended_at < seconds)

    async def attach(self, hw: str, timeout: float) -> tuple[m.AttachResult, Device]:
        r = self.run(hw)
        try:
            result = await asyncio.wait_for(asyncio.shield(r.first_result), timeout)
        except TimeoutError:
            raise AttachFailed(f"no AttachResult for {hw} within {timeout:g}s "
                               f"({r.last_error or 'PBX unreachable?'}); the bridge keeps trying") from None
        except (ConnectionError, ConnectionClosed, InvalidURI) as e:
            raise AttachFailed(str(e)) from None
        if result is None or result.failed:
            if self.runners.get(hw) is r:
                del self.runners[hw]
            err = bounded_result(result).err if result is not None else "no answer"
            raise AttachFailed(f"the PBX refused to attach {hw}: {err}", refused=True)
        return result, r.device

    async def attached(self, hw: str, timeout: float) -> bool:
        r = self.runners.get(hw)
        if r is None or r.session is None:
            return False
        return await r.session.wait_attached(r.device, timeout)

    async def release(self, hw: str, reason: str) -> bool:
        r = self.runners.pop(hw, None)
        if r is None:
            return False
        was = r.device.attached
        await r.stop(reason)
        return was

    def target(self, hw: str) -> tuple[Device, PbxSession] | None:
        r = self.runners.get(hw)
        if r is None or r.session is None:
            return None
        return r.device, r.session

    def devices_up(self) -> list[tuple[Device, bool]]:
        return [(r.device, r.session is not None and not r.session.closed.done())
                for r in self.runners.values()]

    def problems(self) -> list[str]:
        runners = self.runners.values()
        if not runners or any(r.session is not None and not r.session.closed.done() for r in runners):
            return []
        why: dict[str, int] = {}
        for r in runners:
            if r.last_error:
                why[r.last_error] = why.get(r.last_error, 0) + 1
        return ["PBX not reachable: no session is up" + "".join(
            f"; {n} devices: {text}" for text, n in sorted(why.items(), key=lambda kv: -kv[1])[:3])]

    @property
    def reconnects(self) -> int:
        return sum(r.reconnects for r in self.runners.values())

    @property
    def login_failures(self) -> int:
        return sum(r.login_failures for r in self.runners.values())

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop("shutdown") for r in self.runners.values()), return_exceptions=True)
