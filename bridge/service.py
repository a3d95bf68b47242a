"""The bridge: PBX sessions on one side, the broker on the other, commands in between.

This module only wires the adapters together and carries out commands; the protocol logic
lives in :mod:`bridge.protocol` and :mod:`bridge.device`, the broker in :mod:`bridge.amqp`, the
PBX sessions in :mod:`bridge.pbx`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

from websockets.exceptions import ConnectionClosed

from bridge import commands as cmds
from bridge import intercept as ic
from bridge import tracing
from bridge.amqp.consumer import CommandConsumer
from bridge.amqp.intercept import Interceptor
from bridge.amqp.leases import LeaseManager, LeaseRetirer
from bridge.amqp.link import BrokerLink
from bridge.amqp.publisher import EventPublisher
from bridge.config import Settings
from bridge.device import Device
from bridge.events import AttachInfo, EventFactory
from bridge.brokers import endpoint
from bridge.metrics import BrokerSnapshot, InterceptSnapshot, LeaseSnapshot, Snapshot
from bridge.pbx.client import ClientPbx
from bridge.pbx.mode import AttachFailed, CannotDetach, Pbx
from bridge.pbx.server import PbxServer

log = logging.getLogger("bridge")

#: how long an attach reply waits for the PBX's Attached after a good AttachResult
ATTACHED_WAIT_S = 0.5
#: with leases: a held device whose runner ended (attach refused) is tried again after this
RUNNER_RETRY_S = 1.0
#: of a stop's grace, kept for closing the broker connection after the flush
CLOSE_MARGIN_S = 0.5
#: devices per log line when a stop reports the events it could not flush
UNFLUSHED_PER_LINE = 100


class Bridge:
    """One bridge: the PBX side (:class:`~bridge.pbx.mode.Pbx`, client or server mode), the
    publisher of its events, the command consumer, and with EPSIGNAL_LEASES the lease manager
    that says which devices this replica runs. It carries out commands; the protocol is in
    :mod:`bridge.protocol` and :mod:`bridge.device`, the broker in :mod:`bridge.amqp`."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.factory = EventFactory(settings.instance_id, settings.event_kind_list)
        self.link = BrokerLink(settings)
        self.publisher = EventPublisher(
            self.link, self.factory, window=settings.publish_window, timeout_s=settings.publish_timeout_s,
            max_events=settings.buffer_max_events, max_age_s=settings.buffer_max_age_s,
            max_attempts=settings.publish_max_attempts, max_bytes=settings.buffer_max_mb * 2**20,
        )
        #: what the PBX sessions hand their events to: the publisher's buffer (never blocks),
        #: through tracing (each event's creation context) when it is on
        self.emit = tracing.emitter(self.publisher.publish_nowait, settings.events_exchange)
        # the link restores its components in the order they attach, on every connection, and
        # tells them of its loss: the publisher first; the others attach as they are made below
        self.link.attach(self.publisher)
        self._call_limits = settings.call_limits()
        #: intercept mode (docs/INTERCEPT.md): the rules, and the adapter the sessions hold for
        self.rules = settings.intercept_rules()
        self.intercept = Interceptor(self.link, self.rules)
        leases = settings.leases and settings.pbx_mode == "client"
        self.pbx: Pbx = (PbxServer(settings, self._device, self.emit, intercept=self.intercept)
                         if settings.pbx_mode == "server"
                         else ClientPbx(settings, self._device, self.emit, refusals=3 if leases else 0,
                                        autostart=not leases, intercept=self.intercept))
        self.leases = (LeaseManager(self.link, self, settings.device_list, self._on_leased_command)
                       if leases else None)
        if self.leases is not None:
            self.leases.rules = self.rules
        self.consumer = CommandConsumer(self.link, self.handle_command,
                                        redirect=self._redirect if self.leases is not None else None)
        #: leases off: the lease queues of an earlier time with leases on are retired
        self.retirer = (LeaseRetirer(self.link, settings.device_list, self.consumer.refuse)
                        if self.leases is None else None)
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.link.run(), name="broker link"),
            asyncio.create_task(self.publisher.run(), name="publisher"),
        ]
        await self.pbx.start()
        log.info("bridge %s started: %d devices configured, PBX mode %s, event loop %s",
                 self.s.instance_id, len(self.s.device_list), self.s.pbx_mode,
                 type(asyncio.get_running_loop()).__module__.split(".")[0])

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
        self.intercept.fail_all(ic.STOPPING)  # held messages get the fail policy now
        if self.leases is not None:
            self.leases.pause()
        if self.retirer is not None:
            await self.retirer.stop()
        with contextlib.suppress(TimeoutError):  # a stalled broker link must not hold the stop
            await asyncio.wait_for(self.consumer.stop_accepting(), left(0.25))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.consumer.drain(grace_s / 2), left(0.5))
        await self.pbx.stop()
        if self.leases is not None:  # detached first: the next holder's Attach is not refused
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.leases.stop(), left(0.5))
        await self.intercept.close()
        flushed = await self.publisher.flush(left() - CLOSE_MARGIN_S)
        await self.publisher.close()
        if not flushed:
            self._report_unflushed()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.link.close(), CLOSE_MARGIN_S)
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
    def session_states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d, up in self.pbx.devices_up():
            state = "attached" if d.attached else "waiting-registration" if up and d.result else "connecting"
            out[state] = out.get(state, 0) + 1
        return out

    def snapshot(self) -> Snapshot:
        """The figures the metrics show, read at a scrape."""
        pub, link = self.publisher, self.link
        ps, bs = pub.stats, pub.buffer.stats
        lm = self.leases
        return Snapshot(
            sessions=self.session_states(), broker_connected=link.ready,
            broker_blocked=link.blocked is not None, broker_blocks=link.blocks,
            broker_reconnects=link.reconnects, broker_failovers=link.failovers,
            broker=BrokerSnapshot(endpoint(link.address), str(link.server.get("cluster_name", "")),
                                  str(link.server.get("version", "")))
            if link.ready and link.address else None, pbx_reconnects=self.pbx.reconnects,
            login_failures=self.pbx.login_failures,
            events={"published": ps.published, "confirmed": ps.confirmed, "returned": ps.returned,
                    "failed": ps.failed, "nacked": ps.nacked, "made": bs.appended},
            dropped={"buffer-full": bs.dropped_full, "too-old": bs.dropped_age,
                     "nacked": bs.dropped_nacked, "unpublishable": bs.dropped_invalid},
            buffered=len(pub.buffer), stalled_s=pub.stalled_s(), publish_timeouts=ps.timeouts,
            held_by_nacks=pub.buffer.held_devices, unflushed=pub.unflushed,
            commands=dict(self.consumer.stats.by_outcome),
            leases=None if lm is None else LeaseSnapshot(
                held=len(lm.tokens), replicas=len(lm.members.live), handed_on=lm.handed_on,
                wanted_detached=sum(1 for lease in lm.tokens.values() if not lease.wanted()),
                repaired=lm.repaired),
            intercept=InterceptSnapshot(dict(self.intercept.outcomes), self.intercept.held,
                                        dict(self.intercept.ignored)),
        )

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
        return reasons + self.pbx.problems()

    def _device(self, hw: str) -> Device:
        return Device(hw, self.factory, self._call_limits)

    # ------------------------------------------------------------------ leases (bridge.amqp.leases)
    @property
    def _client(self) -> ClientPbx:
        """The PBX side as what it is with leases: they run in client mode only."""
        return cast(ClientPbx, self.pbx)

    def acquired(self, hw: str) -> None:
        if not self._client.ended_within(hw, RUNNER_RETRY_S):
            self._client.run(hw)

    async def released(self, hw: str, reason: str) -> None:
        await self.pbx.release(hw, reason)

    def not_attached(self, hw: str, reason: str) -> None:
        """A device held here stays detached (``wanted-detached``: the lease says so)."""
        ev = self.factory.detached(hw, reason)
        if ev is not None:
            self.emit(ev)

    def running(self) -> list[str]:
        return list(self._client.runners)

    def idle(self, hw: str) -> bool:
        r = self._client.runners.get(hw)
        held = r is not None and r.session is not None and r.session.gate is not None and r.session.gate.calls
        return (r is None or (len(r.device.tracker) == 0 and not held)) and not self.consumer.busy(hw)

    async def _on_leased_command(self, message) -> None:
        await self.consumer.on_message(message, redirect=False)

    async def _redirect(self, hw: str, verb: str) -> str | None:
        """A command that no lease queue took: an attach makes the device's lease queue and moves
        there (its holder carries it out); anything else is for a device nobody holds."""
        leases = self.leases  # (set: the consumer redirects only with leases)
        return await leases.adopt(hw) if verb == "attach" and leases is not None else None

    # ------------------------------------------------------------------ commands
    async def handle_command(self, hw: str, verb: str, cmd: cmds.Command) -> cmds.Reply:
        if verb == "attach":
            return await self._attach(hw)
        if verb == "detach":
            return await self._detach(hw)
        if verb == "intercept":
            return await self._intercept(hw, cast(ic.InterceptCommand, cmd))
        return await self._signaling(hw, cast(cmds.SignalingCommand, cmd))

    async def _attach(self, hw: str) -> cmds.Reply:
        leases = self.leases
        if leases is not None and (not await leases.want(hw, attach=True) or not leases.runs(hw)):
            raise cmds.CommandError(f"the lease of {hw} moved to another replica while the "
                                    "command was carried out; send it again")
        try:
            result, _ = await self.pbx.attach(hw, self.s.attach_timeout_s)
        except AttachFailed as e:
            if e.refused and leases is not None and hw not in leases.configured:
                await leases.want(hw, attach=False)  # not wanted until attached by command again
            raise cmds.CommandError(str(e)) from None
        # a registered device's Attached follows the AttachResult at once: let it arrive, so that
        # `attached` tells registered (true) from waiting for registration (false)
        attached = await self.pbx.attached(hw, ATTACHED_WAIT_S)
        return cmds.Reply(ok=True, command="attach", hw=hw, attach=AttachInfo.from_result(result),
                          attached=attached)

    async def _detach(self, hw: str) -> cmds.Reply:
        try:
            if self.leases is not None:  # the lease's state machine stops the runner
                target = self.pbx.target(hw)
                was = target is not None and target[0].attached
                if not await self.leases.want(hw, attach=False):
                    raise cmds.CommandError(f"the lease of {hw} moved to another replica")
            else:
                was = await self.pbx.release(hw, "command")
        except CannotDetach as e:
            raise cmds.CommandError(str(e)) from None
        return cmds.Reply(ok=True, command="detach", hw=hw, was_attached=was)

    async def _intercept(self, hw: str, cmd: ic.InterceptCommand) -> cmds.Reply:
        """Replace the device's command-set intercept rules. With leases they ride in its lease
        token (the next holder reads them); without, they live here (a restart loses them)."""
        if self.leases is not None:
            if not self.leases.holds(hw):
                raise cmds.CommandError(f"device {hw} is not held by any replica (no lease); attach it first")
            old = self.rules.command.get(hw, ())
            effective = self.rules.set_command(hw, cmd.rules)
            try:
                republished = await self.leases.republish(hw)
            except Exception as e:
                self.rules.set_command(hw, old)
                raise cmds.CommandError(f"the lease token of {hw} could not be replaced ({e}); "
                                        "send it again") from None
            if not republished:
                self.rules.set_command(hw, old)
                raise cmds.CommandError(f"the lease of {hw} moved to another replica while the "
                                        "command was carried out; send it again")
        else:
            effective = self.rules.set_command(hw, cmd.rules)
        return cmds.Reply(ok=True, command="intercept", hw=hw, rules=effective)

    async def _signaling(self, hw: str, cmd: cmds.SignalingCommand) -> cmds.Reply:
        target = self.pbx.target(hw)
        if target is None or target[1].closed.done() or not target[0].attached:
            raise cmds.CommandError(f"device {hw} is not attached")
        device, session = target
        try:
            await session.send_signaling(device, cmd.call, cmd.to, cmd.sig)
        except (ConnectionError, ConnectionClosed) as e:
            raise cmds.CommandError(f"PBX session of {hw} closed while sending: {e}") from None
        return cmds.Reply(ok=True, command="signaling", hw=hw)
