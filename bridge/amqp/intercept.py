"""Intercept mode's broker side (docs/INTERCEPT.md): publishes the requests of held messages and
takes the verdicts. The decisions are :mod:`bridge.intercept`'s; the PBX sessions carry them out.

- Its own channel on the link's connection (not the event publisher's: a request must not wait
  behind buffered events). A request is published with ``mandatory``, not persistent, with
  publisher confirms (aiormq hands a ``basic.return`` to nobody without them): a return (nobody
  bound to its key) is the outcome ``unroutable`` at once, so a dead decider with an
  auto-delete queue costs a call nothing; a nack is ``broker-down``. Nothing waits for the
  confirm but the request's own task.
- Verdicts arrive by RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``, consumed no-ack on
  that channel): no queue to declare, and nothing left behind by a bridge that is gone.
- The channel or the connection lost: every pending request is ``broker-down`` at once; while
  there is no channel a new hold is ``broker-down`` at once too (calls come first).
- One timer for every deadline (``loop.call_at`` on the earliest), not a task per message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta, UTC
from typing import TYPE_CHECKING, Any, Protocol

import aiormq
import msgspec
from aio_pika.abc import AbstractConnection
from pamqp.commands import Basic

from bridge import intercept as ic
from bridge import routing, tracing
from bridge.amqp.link import BrokerLink
from bridge.amqp.topology import Topology
from bridge.commands import Reply, encode_reply
from bridge.metrics import INTERCEPT_WAIT_SECONDS

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from bridge.device import Device

log = logging.getLogger("bridge.intercept")

REPLY_TO = "amq.rabbitmq.reply-to"
#: request ids remembered after their hold ended, to count a verdict as late rather than unknown
LATE_MEMORY = 4096


class Session(Protocol):
    """What the adapter needs of a PBX session (bridge.pbx.session.PbxSession). ``gate`` is
    None when the session holds nothing (intercept off): a session the adapter knows has one."""

    @property
    def gate(self) -> ic.Gate | None: ...

    def carry(self, steps: list[ic.Step]) -> None: ...


class _IdPeek(msgspec.Struct):
    """A verdict's ``id`` only (the verdict without a correlation_id)."""

    id: str = ""


_peek = msgspec.json.Decoder(_IdPeek)


class Interceptor:
    """Requests out, verdicts in, deadlines kept, for every PBX session of one bridge."""

    def __init__(self, link: BrokerLink, rules: ic.Rules, clock: Callable[[], float] | None = None) -> None:
        self.link = link
        self.s = link.s
        self.rules = rules
        #: request numbers, one counter per bridge (shared by its sessions' gates)
        self.counter = itertools.count(1)
        self._ch: aiormq.Channel | None = None
        #: request id -> the session whose gate holds it
        self.pending: dict[str, Session] = {}
        #: every live session (a stop or a lost broker ends their holds)
        self.sessions: set[Session] = set()
        self._spans: dict[str, Span] = {}
        self._ended: deque[str] = deque(maxlen=LATE_MEMORY)
        self._ended_set: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._tasks: set[asyncio.Task[None]] = set()
        self.outcomes: dict[str, int] = dict.fromkeys(ic.OUTCOMES, 0)
        #: verdicts for a hold already ended (late) or never known (unknown)
        self.ignored: dict[str, int] = {"late": 0, "unknown": 0}
        self._bad_logged = 0
        self._clock = clock
        link.attach(self)

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def gate(self) -> ic.Gate:
        """A new session's gate."""
        return ic.Gate(self.rules, self.s.instance_id, self.counter)

    # ------------------------------------------------------------------ channel (a link Component)
    async def restore(self, conn: AbstractConnection, topo: Topology) -> None:
        ch = await (await conn.channel(publisher_confirms=True, on_return_raises=False)).get_underlay_channel()
        assert isinstance(ch, aiormq.Channel)  # basic_publish(wait=False) is the implementation's, not the ABC's
        await ch.basic_consume(REPLY_TO, self._on_verdict, no_ack=True)
        ch.closing.add_done_callback(lambda f: self._channel_lost(ch, f))
        self._ch = ch

    def lost(self, exc: BaseException | None) -> None:
        pass  # the channel's own close ends the holds (_channel_lost)

    def _channel_lost(self, ch: aiormq.abc.AbstractChannel, closing: asyncio.Future) -> None:
        """Every hold ends broker-down; the channel alone closed (the connection lives): open it
        again (BrokerLink.renew), else every later request would end broker-down until the next
        reconnect."""
        if self._ch is not ch:
            return
        self._ch = None
        self.fail_all(ic.BROKER_DOWN)
        why = None if closing.cancelled() else closing.exception()
        self.link.renew(self, f"intercept channel closed by the broker ({why})")

    def fail_all(self, outcome: str) -> None:
        """Every hold ends with ``outcome`` now: broker-down, or stopping (then the gates hold
        nothing more: a message a rule matches gets the fail policy at once)."""
        now = self.now()
        for session in list(self.sessions):
            gate = session.gate
            if gate is not None and (gate.held or outcome == ic.STOPPING):
                session.carry(gate.drain(outcome, now))

    # ------------------------------------------------------------------ requests
    def request(self, session: Session, hold: ic.Hold, device: Device) -> None:
        """Publish the request of ``hold`` (a call of the session's reader or its carrier: never
        waits). Without a channel the hold ends at once (broker-down)."""
        gate = session.gate
        if gate is None or hold.id not in gate.held:  # ended before its turn (the broker went, a stop)
            return
        ch = self._ch
        if ch is None or ch.is_closed or not self.link.ready:
            return self._decide(session, hold.id, ic.Decision(ic.BROKER_DOWN))
        self.pending[hold.id] = session
        rule = hold.rule
        now_wall = datetime.now(UTC)
        left = max(0.001, hold.deadline - self.now())  # the deadline counts from the message's arrival
        body = ic.encode_request(ic.InterceptRequest(
            id=hold.id, hw=hold.hw, instance=self.s.instance_id, time=now_wall, call=hold.call,
            to=hold.to, sig=hold.sig, deadline=now_wall + timedelta(seconds=left),
            deadline_ms=rule.deadline_ms, fail=rule.fail))
        headers: dict | None = None
        if tracing.ENABLED:
            span = tracing.intercept_span(device, hold)
            self._spans[hold.id] = span
            headers = {}
            tracing.inject(headers, span)
        props = Basic.Properties(
            content_type="application/json", reply_to=REPLY_TO, correlation_id=hold.id,
            message_id=hold.id, expiration=str(max(1, round(left * 1000))), message_type="call.intercept",
            timestamp=now_wall, headers=headers)
        task = asyncio.get_running_loop().create_task(self._publish(ch, session, hold, body, props))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._arm(hold.deadline)

    async def _publish(self, ch: aiormq.Channel, session: Session, hold: ic.Hold, body: bytes,
                       props: Basic.Properties) -> None:
        try:
            result = await ch.basic_publish(body, exchange=self.s.events_exchange,
                                            routing_key=routing.call_key(hold.hw, hold.call, "intercept"),
                                            properties=props, mandatory=True, wait=False)
        except Exception as e:
            log.warning("intercept request %s not published (%s): broker-down", hold.id, e)
            result = None
        if isinstance(result, aiormq.abc.DeliveredMessage):  # returned: nobody bound
            self._decide(session, hold.id, ic.Decision(ic.UNROUTABLE))
        elif not isinstance(result, Basic.Ack):
            self._decide(session, hold.id, ic.Decision(ic.BROKER_DOWN))

    # ------------------------------------------------------------------ verdicts
    async def _on_verdict(self, msg: aiormq.abc.DeliveredMessage) -> None:
        """A verdict (a consumer of the reply-to). Awaits nothing: aiormq runs it in a task of
        its own either way (it wraps a plain function in a coroutine)."""
        props = msg.header.properties
        body = msg.body
        id_ = props.correlation_id
        if not id_:
            try:
                id_ = _peek.decode(body).id
            except msgspec.MsgspecError:
                id_ = ""
        session = self.pending.get(id_)
        gate = session.gate if session is not None else None
        hold = gate.held.get(id_) if gate is not None else None
        if session is None or hold is None:
            kind = "late" if id_ in self._ended_set else "unknown"
            self.ignored[kind] += 1
            log.debug("verdict for %s ignored: %s", (id_ or "?")[:100], kind)
            return
        decision = ic.validate_verdict(body, hold)
        if decision.error is not None:
            self._bad_logged += 1
            if self._bad_logged & (self._bad_logged - 1) == 0:  # 1, 2, 4, ...: no flood
                log.warning("bad verdict for %s (%d so far), forwarded unchanged: %s",
                            id_, self._bad_logged, decision.error)
            if props.reply_to and self._ch is not None:
                self._spawn(self._ch.basic_publish(
                    encode_reply(Reply(ok=False, command="verdict", hw=hold.hw, error=decision.error)),
                    routing_key=props.reply_to, properties=Basic.Properties(
                        content_type="application/json", correlation_id=id_, message_type="reply")))
        if tracing.ENABLED and id_ in self._spans:
            tracing.intercept_verdict(self._spans[id_], props.headers)
        self._decide(session, id_, decision)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(_quiet)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ decisions
    def _decide(self, session: Session, id_: str, decision: ic.Decision) -> None:
        gate = session.gate
        if gate is None:
            return
        steps = gate.decide(id_, decision, self.now())
        if steps is not None:
            session.carry(steps)

    def ended(self, release: ic.Release) -> Span | None:
        """A hold has ended (the session reports it as it carries the release out): counted,
        remembered for late verdicts; its span (tracing on), for the events made under it."""
        h = release.hold
        assert h is not None and release.outcome is not None
        self.outcomes[release.outcome] += 1
        INTERCEPT_WAIT_SECONDS.observe(release.waited)
        self.pending.pop(h.id, None)
        if len(self._ended) == self._ended.maxlen:
            self._ended_set.discard(self._ended[0])
        self._ended.append(h.id)
        self._ended_set.add(h.id)
        span = self._spans.pop(h.id, None)
        if span is not None:
            tracing.intercept_end(span, release.outcome, release.action)
        return span

    # ------------------------------------------------------------------ deadlines
    def _arm(self, at: float) -> None:
        if at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = asyncio.get_running_loop().call_at(at, self._expire)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = self.now()
        sessions = {id(session): session for session in self.pending.values()}
        nxt = float("inf")
        for session in sessions.values():
            gate = session.gate
            if gate is None:
                continue
            for id_ in gate.expired(now):
                self._decide(session, id_, ic.Decision(ic.TIMEOUT))
            nxt = min(nxt, gate.next_deadline())
        if nxt != float("inf"):
            self._arm(nxt)

    @property
    def held(self) -> int:
        return len(self.pending)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        ch, self._ch = self._ch, None
        if ch is not None and not ch.is_closed:
            try:
                await ch.close()
            except Exception:
                pass
        for t in list(self._tasks):
            t.cancel()


def _quiet(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("intercept reply failed: %s", task.exception())

