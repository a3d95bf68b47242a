"""The bridge: PBX sessions on one side, the broker on the other, commands in between.

This module only wires the adapters together and carries out commands; the protocol logic
lives in :mod:`bridge.protocol` and :mod:`bridge.device`, the broker in :mod:`bridge.amqp`, the
PBX sessions in :mod:`bridge.pbx`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

from websockets.exceptions import ConnectionClosed

from bridge import commands as cmds
from bridge import tracing
from bridge.amqp.consumer import CommandConsumer
from bridge.amqp.leases import LeaseManager
from bridge.amqp.link import BrokerLink
from bridge.amqp.publisher import EventPublisher
from bridge.config import Settings
from bridge.device import Device, bounded_result
from bridge.events import AttachInfo, EventFactory, Outgoing
from bridge.http import HttpServer
from bridge.pbx.client import DeviceRunner
from bridge.pbx.server import NoPbxSession, PbxServer
from bridge.tls import client_context

log = logging.getLogger("bridge")

#: how long (x 10 ms) an attach reply waits for the PBX's Attached after a good AttachResult
ATTACHED_WAIT_STEPS = 50
#: with leases: a held device whose runner ended (attach refused) is tried again after this
RUNNER_RETRY_S = 1.0
#: of a stop's grace, kept for closing the broker connection after the flush
CLOSE_MARGIN_S = 0.5
#: devices per log line when a stop reports the events it could not flush
UNFLUSHED_PER_LINE = 100


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.factory = EventFactory(settings.instance_id, settings.event_kind_list)
        self.link = BrokerLink(settings)
        self.publisher = EventPublisher(
            self.link, self.factory, window=settings.publish_window, timeout_s=settings.publish_timeout_s,
            max_events=settings.buffer_max_events, max_age_s=settings.buffer_max_age_s,
            max_attempts=settings.publish_max_attempts, max_bytes=settings.buffer_max_mb * 2**20,
        )
        self.server = PbxServer(settings, self.emit) if settings.pbx_mode == "server" else None
        self.leases = None
        if settings.leases and self.server is None:
            self.leases = LeaseManager(self.link, self, settings.device_list, self._on_leased_command)
        self.consumer = CommandConsumer(self.link, self.handle_command,
                                        redirect=self._redirect if self.leases is not None else None)
        self.runners: dict[str, DeviceRunner] = {}
        self._gate = asyncio.Semaphore(settings.attach_concurrency)
        self._pbx_ssl = (client_context(settings.pbx_ca_file, settings.pbx_tls_verify)
                         if settings.pbx_url.startswith("wss:") else None)
        self._tasks: list[asyncio.Task] = []
        self._call_limits = settings.call_limits()
        self.http = HttpServer(self, settings.http_host, settings.http_port)

    def emit(self, event: Outgoing) -> None:
        """Hand an event to the publisher (never blocks); with tracing, its creation context."""
        if tracing.ENABLED:
            tracing.creation(event, self.s.events_exchange)
        self.publisher.publish_nowait(event)

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        await self.http.start()
        self._tasks = [
            asyncio.create_task(self.link.run(), name="broker link"),
            asyncio.create_task(self.publisher.run(), name="publisher"),
        ]
        if self.server is not None:
            for hw in self.s.device_list:
                self.server.devices[hw] = self._device(hw)
            await self.server.start()
        elif self.leases is None:
            for hw in self.s.device_list:
                self._runner(hw)
        log.info("bridge %s started: %d devices configured, PBX mode %s",
                 self.s.instance_id, len(self.s.device_list), self.s.pbx_mode)

    async def stop(self, grace_s: float = 10.0) -> bool:
        """Graceful stop: no new commands, finish those in progress, close the PBX sessions,
        flush events with confirms, all within ``grace_s``. True if nothing was left unsent.

        A broker that is away is tried at once and every quarter second meanwhile (not at the
        backoff's pace), so one that comes back inside the grace takes every event. What is
        still unconfirmed at the end is counted (``epsignal_events_unflushed``) and logged as
        per-device seq ranges."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s

        def left(share: float = 1.0) -> float:
            return max(0.05, (deadline - loop.time()) * share)

        self.link.hurry()
        if self.leases is not None:
            self.leases.pause()
        with contextlib.suppress(TimeoutError):  # a stalled broker link must not hold the stop
            await asyncio.wait_for(self.consumer.stop_accepting(), left(0.25))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.consumer.drain(grace_s / 2), left(0.5))
        await asyncio.gather(*(r.stop() for r in self.runners.values()), return_exceptions=True)
        for r in self.runners.values():
            for ev in r.device.on_lost("shutdown"):
                self.emit(ev)
        if self.leases is not None:  # detached first: the next holder's Attach is not refused
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.leases.stop(), left(0.5))
        if self.server is not None:
            await self.server.close()
        flushed = await self.publisher.flush(left() - CLOSE_MARGIN_S)
        await self.publisher.close()
        if not flushed:
            self._report_unflushed()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.link.close(), CLOSE_MARGIN_S)
        await self.http.stop()
        for t in self._tasks:
            t.cancel()
        # bounded: a broker connect in progress may take its own time to give up
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), CLOSE_MARGIN_S)
        return flushed

    def _report_unflushed(self) -> None:
        buf = self.publisher.buffer
        self.publisher.unflushed = len(buf)
        unsent = buf.unsent()
        log.error("shutdown: %d events not confirmed by the broker within the grace period are "
                  "lost (%d devices; seq ranges follow)", len(buf), len(unsent))
        items = sorted(unsent.items())
        for i in range(0, len(items), UNFLUSHED_PER_LINE):
            part = {hw: [f"{a}-{b}" if a != b else str(a) for a, b in rs]
                    for hw, rs in items[i:i + UNFLUSHED_PER_LINE]}
            log.error("shutdown: events lost: %s", part)

    # ------------------------------------------------------------------ state, for health and metrics
    def _devices(self) -> list[tuple[Device, bool]]:
        """(device, its PBX session is up) for every device the bridge wants attached."""
        if self.server is not None:
            up = self.server.session is not None
            return [(d, up and d.hw in self.server.session.devices) for d in self.server.devices.values()]
        return [(r.device, r.session is not None and not r.session.closed.done()) for r in self.runners.values()]

    def session_states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d, up in self._devices():
            state = "attached" if d.attached else "waiting-registration" if up and d.result else "connecting"
            out[state] = out.get(state, 0) + 1
        return out

    def pbx_reconnects(self) -> int:
        return sum(r.reconnects for r in self.runners.values())

    def login_failures(self) -> int:
        if self.server is not None:
            return self.server.logins_failed
        return sum(r.login_failures for r in self.runners.values())

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        if not self.link.ready:
            err = self.link.last_error
            reasons.append(f"broker not connected: {err}" if err else "broker not connected")
        elif self.link.blocked is not None:
            reasons.append(f"broker blocks publishing ({self.link.blocked}): "
                           f"{len(self.publisher.buffer)} events buffered")
        elif (stalled := self.publisher.stalled_s()) > self.s.publish_timeout_s:
            reasons.append(f"broker confirms nothing: {len(self.publisher.buffer)} events waiting "
                           f"for {stalled:.0f}s")
        if self.leases is not None and self.leases.problem:
            reasons.append(self.leases.problem)
        devices = self._devices()
        if self.server is None and devices and not any(up for _, up in devices):
            why: dict[str, int] = {}
            for r in self.runners.values():
                if r.last_error:
                    why[r.last_error] = why.get(r.last_error, 0) + 1
            reasons.append("PBX not reachable: no session is up" + "".join(
                f"; {n} devices: {text}" for text, n in sorted(why.items(), key=lambda kv: -kv[1])[:3]))
        return reasons

    def _device(self, hw: str) -> Device:
        return Device(hw, self.factory, self._call_limits)

    def _runner(self, hw: str) -> DeviceRunner:
        r = self.runners.get(hw)
        if r is None or (r.task is not None and r.task.done()):
            r = DeviceRunner(self.s, self._device(hw), self.emit, self._gate, self._pbx_ssl,
                             refusals=3 if self.leases is not None else 0)
            self.runners[hw] = r
            r.start()
        return r

    # ------------------------------------------------------------------ leases (bridge.amqp.leases)
    def acquired(self, hw: str) -> None:
        r = self.runners.get(hw)
        if r is not None and r.task is not None and r.task.done() and (
                asyncio.get_running_loop().time() - r.ended_at < RUNNER_RETRY_S):
            return
        self._runner(hw)

    async def released(self, hw: str, reason: str) -> None:
        r = self.runners.pop(hw, None)
        if r is not None:
            await r.stop()
            for ev in r.device.on_lost(reason):
                self.emit(ev)

    def idle(self, hw: str) -> bool:
        r = self.runners.get(hw)
        return (r is None or len(r.device.tracker) == 0) and not self.consumer.busy(hw)

    async def _on_leased_command(self, message) -> None:
        await self.consumer.on_message(message, redirect=False)

    async def _redirect(self, hw: str, verb: str) -> str | None:
        """A command that no lease queue took: an attach makes the device's lease queue and moves
        there (its holder carries it out); anything else is for a device nobody holds."""
        return await self.leases.adopt(hw) if verb == "attach" else None

    # ------------------------------------------------------------------ commands
    async def handle_command(self, hw: str, verb: str, cmd: cmds.Command) -> cmds.Reply:
        if verb == "attach":
            return await self._attach(hw)
        if verb == "detach":
            return await self._detach(hw)
        return await self._signaling(hw, cmd)

    async def _attach(self, hw: str) -> cmds.Reply:
        timeout = self.s.attach_timeout_s
        try:
            if self.server is not None:
                result = await asyncio.wait_for(self.server.attach(self._device(hw)), timeout)
                device = self.server.devices[hw]
            else:
                if self.leases is not None:
                    if not await self.leases.want(hw, True) or not self.leases.runs(hw):
                        raise cmds.CommandError(f"the lease of {hw} moved to another replica while "
                                                "the command was carried out; send it again")
                r = self._runner(hw)  # (with leases: no await since runs() said so)
                result = await asyncio.wait_for(asyncio.shield(r.first_result), timeout)
                device = r.device
        except TimeoutError:
            last = self.runners[hw].last_error if hw in self.runners else None
            raise cmds.CommandError(
                f"no AttachResult for {hw} within {timeout:g}s ({last or 'PBX unreachable?'}); "
                "the bridge keeps trying"
            ) from None
        except (NoPbxSession, ConnectionError, ConnectionClosed) as e:
            raise cmds.CommandError(str(e)) from None
        if result is None or result.failed:
            err = bounded_result(result).err if result is not None else "no answer"
            if self.server is not None:
                self.server.devices.pop(hw, None)
                if self.server.session is not None:
                    self.server.session.devices.pop(hw, None)
            elif self.runners.get(hw) is r:
                del self.runners[hw]
                if self.leases is not None and hw not in self.leases.configured:
                    await self.leases.want(hw, False)  # not wanted until attached by command again
            raise cmds.CommandError(f"the PBX refused to attach {hw}: {err}")
        # a registered device's Attached follows the AttachResult at once: let it arrive, so that
        # `attached` tells registered (true) from waiting for registration (false)
        for _ in range(ATTACHED_WAIT_STEPS):
            if device.attached:
                break
            await asyncio.sleep(0.01)
        return cmds.Reply(ok=True, command="attach", hw=hw, attach=AttachInfo.from_result(result),
                          attached=device.attached)

    async def _detach(self, hw: str) -> cmds.Reply:
        if self.server is not None:
            raise cmds.CommandError(
                "detach is not possible in server mode: EpSignal has no Detach message and the "
                "PBX session carries every device"
            )
        if self.leases is not None:  # the lease's state machine stops the runner
            r = self.runners.get(hw)
            was = r is not None and r.device.attached
            if not await self.leases.want(hw, False):
                raise cmds.CommandError(f"the lease of {hw} moved to another replica")
            return cmds.Reply(ok=True, command="detach", hw=hw, was_attached=was)
        r = self.runners.pop(hw, None)
        if r is None:
            return cmds.Reply(ok=True, command="detach", hw=hw, was_attached=False)
        was = r.device.attached
        await r.stop()
        for ev in r.device.on_lost("command"):
            self.emit(ev)
        return cmds.Reply(ok=True, command="detach", hw=hw, was_attached=was)

    async def _signaling(self, hw: str, cmd: cmds.SignalingCommand) -> cmds.Reply:
        if self.server is not None:
            device = self.server.devices.get(hw)
            session = self.server.session
        else:
            r = self.runners.get(hw)
            device, session = (r.device, r.session) if r is not None else (None, None)
        if device is None or session is None or session.closed.done() or not device.attached:
            raise cmds.CommandError(f"device {hw} is not attached")
        try:
            await session.send_signaling(device, cmd.call, cmd.to, cmd.sig)
        except (ConnectionError, ConnectionClosed) as e:
            raise cmds.CommandError(f"PBX session of {hw} closed while sending: {e}") from None
        return cmds.Reply(ok=True, command="signaling", hw=hw)


#: the cyclic GC's first threshold while serving (CPython's default is 700). Every frame makes
#: and drops small containers (and with tracing the SDK keeps spans queued until exported), so
#: with 700 the collector ran ~100 times a second and its older generations kept re-walking the
#: survivors: in the tracing benchmark GC took 2.7 s of 28.6 s CPU (tracing on) and 1.1 s of 20 s
#: (off); with 10,000, 0.26 s and 0.21 s. Garbage in cycles waits a little longer, that is all.
GC_THRESHOLD0 = 10_000


def tune_gc() -> None:
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])


async def run_until_signalled(settings: Settings, grace_s: float = 10.0) -> int:
    """``epsignal-bridge run``: start, serve until SIGTERM/SIGINT, stop gracefully."""
    import signal

    tracing.configure()
    tune_gc()
    bridge = Bridge(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await bridge.start()
    await stop.wait()
    log.info("stopping (grace %.0fs)", grace_s)
    flushed = await bridge.stop(grace_s)
    return 0 if flushed else 1

