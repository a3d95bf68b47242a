"""The broker connection: connect, declare, hand out channels, and come back after any loss.

One :class:`BrokerLink` owns the aio-pika connection and its recovery (as aio-pika's
RobustConnection restores its RobustChannels, but with one owner for the bridge's components):
it connects with exponential backoff and jitter (:func:`bridge.backoff.broker_connect`),
declares the topology on every (re)connect and then calls :meth:`Component.restore` of each
component in the order they were attached (the bridge's: the publisher, the intercept adapter
and the lease manager through :meth:`BrokerLink.on_ready`, the command consumer, the lease
retirer). The moment the connection is given
up it marks itself not ready and calls each component's :meth:`Component.lost`, so nothing
writes into a dead socket nor polls for one. A component whose own channel closes while the
connection stays asks for it again (:meth:`BrokerLink.renew`): the link restores that component
alone, and gives the connection up only if that fails.

Each connection has a :attr:`lost` future, done the moment the link gives that connection up
(closed by the broker, the watchdog, :meth:`reset`): whoever works on the connection races its
waits against it, so nothing waits on a connection that is gone (the publisher cancels its
drain). RabbitMQ's ``connection.blocked`` / ``unblocked`` (a memory or disk alarm) are followed
in :attr:`blocked`: the broker is there but takes no publishes; nothing is written meanwhile and
the watchdog does not mistake the silence for a dead broker.

The broker may have several addresses (the nodes of a cluster: EPSIGNAL_AMQP_URL as a list, or
EPSIGNAL_AMQP_HOSTS; :mod:`bridge.brokers`). The link tries them in turn: a failed attempt moves
on to the next address after a short random pause, and only a whole round of failures backs off
exponentially (tenacity, with jitter), so a dead node is not retried while another one may
answer; a connection lost moves on to the next address too (its node may be the one that died).
Which address it is on, and the cluster and version the broker reports, are logged and in
:attr:`address` / :attr:`server` (metric ``epsignal_broker_info``); moves to another address are
counted in :attr:`failovers`. A queue that exists with other arguments (:class:`QueueMismatch`)
is logged once as an ERROR saying what to do, and stays in :attr:`last_error` (readiness) while
the link retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection
from tenacity import AsyncRetrying, retry_if_exception_type
from yarl import URL

from bridge import backoff, brokers
from bridge.amqp.topology import QueueMismatch, Topology, declare_exchanges
from bridge.config import Settings
from bridge.tls import client_context

log = logging.getLogger("bridge.amqp")

#: how long one connect attempt may take (TCP, TLS, the AMQP handshake)
CONNECT_TIMEOUT_S = 10.0

ReadyHook = Callable[[AbstractConnection, Topology], Awaitable[None]]


class Component(Protocol):
    """What the link asks of a component that works on its connection."""

    def restore(self, conn: AbstractConnection, topo: Topology) -> Awaitable[None]:
        """(A coroutine.) A new connection with the topology declared: open your channels,
        declare your own queues, consume. Raising fails this connection (the link retries and
        says why). Called again by :meth:`BrokerLink.renew`, on the same connection, after
        your own channel closed."""

    def lost(self, exc: BaseException | None) -> None:
        """The connection is given up (``exc``: why): what was on it is gone. Called at once,
        from a callback: must not block nor raise."""


class _OnReady:
    """A component that only needs :meth:`restore` (a hook given to :meth:`BrokerLink.on_ready`)."""

    def __init__(self, hook: ReadyHook) -> None:
        self._hook = hook

    def restore(self, conn: AbstractConnection, topo: Topology) -> Awaitable[None]:
        return self._hook(conn, topo)

    def lost(self, exc: BaseException | None) -> None:
        pass


def redact(url: str | None) -> str:
    """The URL without its password, for log lines."""
    u = URL(str(url))
    return str(u.with_password("***")) if u.password else str(u)


class BrokerLink:
    """The one broker connection and the one owner of its recovery: connects (address after
    address, with backoff), declares the topology, restores the components attached with
    :meth:`attach` on every new connection and tells them when it is lost; a component's
    channel that closes alone is given back by :meth:`renew`. Readiness (:attr:`ready`,
    :attr:`last_error`), broker alarms (:attr:`blocked`) and the watchdog live here too."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        #: the broker's addresses, tried in turn from :attr:`_next`
        self.addresses = settings.broker_addresses()
        self._next = 0
        #: the address of the current connection, and what the broker said of itself
        self.address: str | None = None
        self.server: dict = {}
        self.failovers = 0
        self._last_address: str | None = None
        #: why the last attempt failed (None once connected)
        self.last_error: str | None = None
        self._ssl = (client_context(settings.amqp_ca_file)
                     if any(a.startswith("amqps:") for a in self.addresses) else None)
        self.connection: AbstractConnection | None = None
        self.channel: AbstractChannel | None = None  # publisher confirms on
        self.topology: Topology | None = None
        self._ready = asyncio.Event()
        self._components: list[Component] = []
        #: id() of a component being restored alone -> the ``lost`` of the connection it is on
        self._renewing: dict[int, asyncio.Future] = {}
        #: id() of a component -> (its renews in a row, the monotonic time it was last reopened)
        self._renews: dict[int, tuple[int, float]] = {}
        #: the connection whose components are being restored (not ready yet), its topology, its lost
        self._restoring: tuple[AbstractConnection, Topology, asyncio.Future] | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.reconnects = 0
        #: done when the current connection is given up (its result: the reason)
        self.lost: asyncio.Future | None = None
        #: the broker's reason while it blocks publishing (``connection.blocked``), else None
        self.blocked: str | None = None
        self.blocked_since = 0.0
        self.blocks = 0
        self._unblocked = asyncio.Event()
        self._unblocked.set()
        #: monotonic time the broker last showed it is alive (a confirm, a watchdog answer)
        self.heard_at = 0.0
        self._hurry = asyncio.Event()

    def attach(self, component: Component) -> None:
        """Restore ``component`` on every new connection (after the topology and the components
        attached before it) and tell it when the connection is lost."""
        self._components.append(component)

    def on_ready(self, hook: ReadyHook) -> None:
        """Run ``hook(conn, topo)`` on every new connection (a component with nothing to do on
        a loss: it follows its own channel)."""
        self.attach(_OnReady(hook))

    def renew(self, component: Component, reason: str) -> None:
        """``component``'s own channel closed while the connection stays (e.g. the broker closed
        it for a failed declare): restore that component alone on the current connection; should
        that fail, give the connection up (the next one restores everything). Nothing happens
        when the connection is lost already: its successor restores the component anyway."""
        # a component restored on the connection being set up asks for that one, not yet current
        conn, topo, lost = self._restoring or (self.connection, self.topology, self.lost)
        if (self._closing or lost is None or lost.done() or conn is None or conn.is_closed
                or topo is None or self._renewing.get(id(component)) is lost):
            return  # (one being restored for an older connection: that one gives up, this goes on)
        self._renewing[id(component)] = lost
        # a channel the broker closes again and again (e.g. each request to a deleted exchange)
        # is opened again after a growing pause, not at once every time
        n, reopened = self._renews.get(id(component), (0, -backoff.CHANNEL_STABLE_S))
        n = n + 1 if time.monotonic() - reopened < backoff.CHANNEL_STABLE_S else 0
        self._renews[id(component)] = (n, reopened)
        pause = backoff.channel_reopen(n) if n else 0.0
        task = asyncio.create_task(self._renew(component, reason, conn, topo, lost, pause))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renew(self, component: Component, reason: str, conn: AbstractConnection,
                     topo: Topology, lost: asyncio.Future, pause: float) -> None:
        log.warning("%s; opening it again%s", reason, f" in {pause:g} s (closed again soon after opening)"
                    if pause else "")
        try:
            if pause:
                await asyncio.sleep(pause)
                if lost.done() or conn.is_closed:  # reconnecting meanwhile: the next one restores it
                    return
            await component.restore(conn, topo)
            self._renews[id(component)] = (self._renews[id(component)][0], time.monotonic())
        except Exception as e:
            if not lost.done() and not conn.is_closed:  # else the link is reconnecting already
                log.warning("%s, and opening it again failed (%s: %s); reconnecting", reason,
                            type(e).__name__, e)
                self.reset(f"{reason}; opening it again failed: {e}", lost)
        finally:
            if self._renewing.get(id(component)) is lost:
                del self._renewing[id(component)]

    def _tell_lost(self, lost: asyncio.Future) -> None:
        """The connection of ``lost`` is given up: not ready, and every component knows, now."""
        self._ready.clear()
        exc = None if lost.cancelled() else lost.result()
        for c in self._components:
            try:
                c.lost(exc)
            except Exception:  # one component's bug must not keep the others from knowing
                log.exception("broker link: %r failed to take the connection loss", c)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def wait_unblocked(self) -> None:
        await self._unblocked.wait()

    def reset(self, reason: str, lost: asyncio.Future | None = None) -> None:
        """Give up the current connection (or only the one whose :attr:`lost` is ``lost``, if
        it is still current): e.g. confirms stopped coming. The link reconnects."""
        if lost is None:
            lost = self.lost
        if lost is not None and not lost.done():
            lost.set_result(ConnectionError(reason))

    def hurry(self) -> None:
        """Try the broker at once and then every :data:`bridge.backoff.HURRY_RETRY_S` (a stop
        that has events to flush cannot wait for the backoff)."""
        self._hurry.set()

    async def _sleep(self, seconds: float) -> None:
        """A backoff pause that :meth:`hurry` cuts short."""
        try:
            await asyncio.wait_for(self._hurry.wait(), seconds)
        except TimeoutError:
            pass

    def _on_blocked(self, reason) -> None:
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        self.blocked = str(reason or "blocked")
        self.blocked_since = time.monotonic()
        self.blocks += 1
        self._unblocked.clear()
        log.warning("broker blocks publishing (%s): events stay buffered until it unblocks", self.blocked)

    def _on_unblocked(self) -> None:
        if self.blocked is not None:
            log.warning("broker unblocked publishing after %.1fs", time.monotonic() - self.blocked_since)
        self.blocked = None
        self._unblocked.set()

    async def _connect_once(self) -> asyncio.Future:
        """Connect to the next address (the one after it next time, should this fail)."""
        url = self.addresses[self._next % len(self.addresses)]
        kw: dict[str, Any] = dict(heartbeat=self.s.heartbeat_s, client_properties={
            "connection_name": f"epsignal-bridge {self.s.instance_id}"})
        if url.startswith("amqps:"):
            kw["ssl_context"] = self._ssl
        try:
            conn = await connect(url, CONNECT_TIMEOUT_S, **kw)
        except BaseException:
            self._next += 1
            raise
        lost: asyncio.Future = asyncio.get_running_loop().create_future()
        lost.add_done_callback(self._tell_lost)  # not ready, and the components know, at once
        try:
            _follow_blocked(conn, self._on_blocked, self._on_unblocked)
            conn.close_callbacks.add(lambda _c, exc: _resolve(lost, exc))
            ch = await conn.channel(publisher_confirms=True, on_return_raises=False)
            ch.close_callbacks.add(lambda _c, exc: _resolve(lost, exc))
            # aio-pika runs close_callbacks from a task, a loop turn or two after the channel
            # closed; the publisher must stop writing on it at once: aiormq's own future says so
            (await ch.get_underlay_channel()).closing.add_done_callback(
                lambda f: _resolve(lost, _closed_reason(f)))
            topo = await declare_exchanges(ch, self.s)
            self._restoring = (conn, topo, lost)
            try:
                for component in self._components:
                    await component.restore(conn, topo)
            finally:
                self._restoring = None
        except BaseException as e:
            self._next += 1
            self._failed(e)
            if not lost.done():  # the components restored on it learn it is gone
                lost.set_result(e)
            await conn.close()
            raise
        self.address, self.last_error = url, None
        transport = conn.transport  # (there is one: the connection is open)
        self.server = dict(transport.connection.server_properties or {}) if transport is not None else {}
        self.connection, self.channel, self.topology = conn, ch, topo
        self.lost = lost
        self.heard_at = time.monotonic()
        return lost

    async def run(self) -> None:
        """Stay connected until :meth:`close`."""
        first = True
        short_lived = 0
        while not self._closing:
            retrying = AsyncRetrying(
                wait=backoff.broker_connect(self.s, len(self.addresses), self._hurry),
                sleep=self._sleep,
                retry=retry_if_exception_type(Exception),
                stop=lambda _rs: self._closing,
                before_sleep=self._before_sleep,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        lost = await self._connect_once()
            except Exception as e:
                if self._closing:  # close() while connecting: the attempt ends, said once
                    log.info("broker link closed while connecting (%s)", _reason(e))
                    return
                raise
            if self._closing:
                await self._close_conn()
                return
            if not first:
                self.reconnects += 1
            first = False
            if self._last_address is not None and self.address != self._last_address:
                self.failovers += 1
            self._last_address = self.address
            log.info("broker connected: %s (cluster %s, RabbitMQ %s)", redact(self.address),
                     self.server.get("cluster_name", "?"), self.server.get("version", "?"))
            if not lost.done():
                self._ready.set()
            watchdog = asyncio.create_task(self._watchdog(lost))
            loop = asyncio.get_running_loop()
            started = loop.time()
            exc = await lost
            watchdog.cancel()
            self._ready.clear()
            self.channel = None
            self._on_unblocked()  # a new connection starts unblocked; the broker says again
            if not self._closing:
                short_lived = short_lived + 1 if loop.time() - started < self.s.reconnect_max_s else 0
                pause = backoff.broker_lost(self.s, short_lived, self._hurry)
                where = brokers.endpoint(self.address) if self.address else "?"  # (it is set)
                log.warning("broker connection lost (%s): %s; reconnecting in %.1fs", where, _reason(exc), pause)
                self.last_error = f"connection to {where} lost: {_reason(exc)}"
                self.address = None
                self._next += 1  # its node may be the one that died: another one first
                await self._close_conn()
                await self._sleep(pause)

    def _failed(self, e: BaseException) -> None:
        """A connected attempt failed after the connection opened (declaring the topology): a
        queue with other arguments is an ERROR, once for each new reason."""
        if isinstance(e, QueueMismatch):
            if str(e) != self.last_error:
                log.error("broker %s: %s", redact(self.addresses[(self._next - 1) % len(self.addresses)]), e)
            self.last_error = str(e)

    def _before_sleep(self, rs) -> None:
        e = rs.outcome.exception()
        failed = self.addresses[(self._next - 1) % len(self.addresses)]
        nxt = self.addresses[self._next % len(self.addresses)]
        if isinstance(e, QueueMismatch):  # said once, as an ERROR (_failed)
            log.debug("broker %s: %s; retry in %.1fs", redact(failed), e, rs.next_action.sleep)
            return
        self.last_error = f"{brokers.endpoint(failed)}: {_reason(e)}"
        log.warning("broker %s unreachable (%s), %s in %.1fs", redact(failed), _reason(e),
                    "retry" if nxt == failed else f"trying {brokers.endpoint(nxt)}", rs.next_action.sleep)

    async def _watchdog(self, lost: asyncio.Future) -> None:
        """A broker that stops answering is noticed within the heartbeat interval: every half
        interval a passive declare must come back within half an interval. (The AMQP client's
        own heartbeat check allows three missed beats, which is too slow for readiness.) A
        broker that confirmed something within the last half interval is alive without asking
        (under load the answer could queue behind the frames of a busy loop), and so is one
        that blocks publishing: it said so, and a blocked connection's probe may not be read."""
        half = self.s.heartbeat_s / 2
        while not lost.done():
            await asyncio.sleep(half)
            ch = self.channel
            if ch is None or lost.done():
                return
            if self.blocked is not None or time.monotonic() - self.heard_at < half:
                continue
            try:
                async with asyncio.timeout(half):  # not wait_for: see connect()
                    await ch.get_exchange(self.s.events_exchange, ensure=True)
                self.heard_at = time.monotonic()
            except Exception as e:
                if not lost.done():
                    lost.set_result(TimeoutError(
                        f"broker did not answer for {self.s.heartbeat_s:g}s ({type(e).__name__})"))
                return

    async def _close_conn(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None and not conn.is_closed:
            try:
                async with asyncio.timeout(5):  # not wait_for: see connect()
                    await conn.close()
            except Exception:  # already broken: nothing left to release
                pass

    async def close(self) -> None:
        self._closing = True
        self._ready.clear()
        for task in list(self._tasks):  # components being restored alone (renew)
            task.cancel()
        self.reset("closing")
        await self._close_conn()


async def connect(url: str, timeout: float, **kw: Any) -> AbstractConnection:
    """``aio_pika.connect(url, **kw)`` within ``timeout`` seconds, in the caller's own task.

    The timeout is not aio-pika's: aio-pika runs aiormq's connect in a task of its own under
    :func:`asyncio.wait_for`, and Python 3.11's wait_for, when its caller is cancelled (a stop
    while connecting), cancels that task and waits for it but never retrieves its exception.
    aiormq ends a connect that is cancelled while failing (a reset, a refused login) with the
    failure, not CancelledError, so that task was left with an exception nobody retrieved, which
    the garbage collector reports later wherever the process is then ("Task exception was never
    retrieved"; in a test run it once broke an unrelated test's ``ast.parse``). Awaited directly,
    under :func:`asyncio.timeout`, whatever the connect ends with reaches the caller."""
    async with asyncio.timeout(timeout):
        return await aio_pika.connect(url, timeout=None, **kw)


def _resolve(lost: asyncio.Future, exc: BaseException | None) -> None:
    """The connection of ``lost`` is gone (the first reason given is kept)."""
    if not lost.done():
        lost.set_result(exc)


def _closed_reason(closing: asyncio.Future) -> BaseException | None:
    """Why aiormq closed a channel (its ``closing`` future)."""
    if closing.cancelled():
        return ConnectionError("channel closed")
    return closing.exception()


def _follow_blocked(conn: AbstractConnection, on_blocked, on_unblocked) -> None:
    """Call ``on_blocked(reason)`` / ``on_unblocked()`` when the broker sends
    ``connection.blocked`` / ``unblocked``. Neither aio-pika nor aiormq offers a callback
    (aio-pika issue 506): aiormq handles both frames in two private methods, which are wrapped
    here on this one connection object. ``tests/integration/test_broker_alarm.py`` checks it
    against a real memory alarm, so an aiormq that renames them fails a test, not production."""
    transport = conn.transport
    raw = transport.connection if transport is not None else None
    names = ("_Connection__handle_connection_blocked", "_Connection__handle_connection_unblocked")
    if not all(hasattr(raw, n) for n in names):
        log.warning("this aiormq does not let the bridge follow connection.blocked; "
                    "a broker alarm shows only as events not confirmed")
        return
    blocked, unblocked = (getattr(raw, n) for n in names)

    async def on_b(frame) -> None:
        await blocked(frame)
        on_blocked(frame.reason)

    async def on_u(frame) -> None:
        await unblocked(frame)
        on_unblocked()

    setattr(raw, names[0], on_b)
    setattr(raw, names[1], on_u)


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
