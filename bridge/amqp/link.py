"""The broker connection: connect, declare, hand out channels, and come back after any loss.

One :class:`BrokerLink` owns the aio-pika connection. It connects with exponential backoff and
jitter (tenacity), declares the topology on every (re)connect, runs the ``on_ready`` hooks (the
command consumer starts there), and marks itself not ready the moment the connection closes,
so publishers wait (with timeouts) instead of writing into a dead socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter
from yarl import URL

from bridge.amqp.topology import Topology, declare_exchanges
from bridge.config import Settings
from bridge.tls import client_context

log = logging.getLogger("bridge.amqp")

ReadyHook = Callable[[AbstractConnection, Topology], Awaitable[None]]


def redact(url: str) -> str:
    """The URL without its password, for log lines."""
    u = URL(str(url))
    return str(u.with_password("***")) if u.password else str(u)


class BrokerLink:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._ssl = client_context(settings.amqp_ca_file) if str(settings.amqp_url).startswith("amqps:") else None
        self.connection: AbstractConnection | None = None
        self.channel: AbstractChannel | None = None  # publisher confirms on
        self.topology: Topology | None = None
        self._ready = asyncio.Event()
        self._hooks: list[ReadyHook] = []
        self._closing = False
        self.reconnects = 0

    def on_ready(self, hook: ReadyHook) -> None:
        self._hooks.append(hook)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _connect_once(self) -> asyncio.Future:
        kw = dict(heartbeat=self.s.heartbeat_s, timeout=10, client_properties={
            "connection_name": f"epsignal-bridge {self.s.instance_id}"})
        if self._ssl is not None:
            kw["ssl_context"] = self._ssl
        conn = await aio_pika.connect(str(self.s.amqp_url), **kw)
        try:
            lost: asyncio.Future = asyncio.get_running_loop().create_future()
            conn.close_callbacks.add(
                lambda _c, exc: lost.done() or lost.set_result(exc)
            )
            ch = await conn.channel(publisher_confirms=True, on_return_raises=False)
            ch.close_callbacks.add(lambda _c, exc: lost.done() or lost.set_result(exc))
            topo = await declare_exchanges(ch, self.s)
            for hook in self._hooks:
                await hook(conn, topo)
        except BaseException:
            await conn.close()
            raise
        self.connection, self.channel, self.topology = conn, ch, topo
        return lost

    async def run(self) -> None:
        """Stay connected until :meth:`close`."""
        first = True
        short_lived = 0
        while not self._closing:
            retrying = AsyncRetrying(
                wait=wait_exponential_jitter(multiplier=self.s.reconnect_min_s, max=self.s.reconnect_max_s),
                retry=retry_if_exception_type(Exception),
                before_sleep=lambda rs: log.warning(
                    "broker %s unreachable (%s), retry in %.1fs", redact(self.s.amqp_url),
                    _reason(rs.outcome.exception()), rs.next_action.sleep),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    lost = await self._connect_once()
            if not first:
                self.reconnects += 1
            first = False
            log.info("broker connected: %s", redact(self.s.amqp_url))
            self._ready.set()
            watchdog = asyncio.create_task(self._watchdog(lost))
            loop = asyncio.get_running_loop()
            started = loop.time()
            exc = await lost
            watchdog.cancel()
            self._ready.clear()
            self.channel = None
            if not self._closing:
                short_lived = short_lived + 1 if loop.time() - started < self.s.reconnect_max_s else 0
                pause = self.s.reconnect_pause(short_lived)
                log.warning("broker connection lost: %s; reconnecting in %.1fs", _reason(exc), pause)
                await self._close_conn()
                await asyncio.sleep(pause)

    async def _watchdog(self, lost: asyncio.Future) -> None:
        """A broker that stops answering is noticed within the heartbeat interval: every half
        interval a passive declare must come back within half an interval. (The AMQP client's
        own heartbeat check allows three missed beats, which is too slow for readiness.)"""
        half = self.s.heartbeat_s / 2
        while not lost.done():
            await asyncio.sleep(half)
            ch = self.channel
            if ch is None or lost.done():
                return
            try:
                await asyncio.wait_for(ch.get_exchange(self.s.events_exchange, ensure=True), half)
            except Exception as e:
                if not lost.done():
                    lost.set_result(TimeoutError(
                        f"broker did not answer for {self.s.heartbeat_s:g}s ({type(e).__name__})"))
                return

    async def _close_conn(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None and not conn.is_closed:
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:  # already broken: nothing left to release
                pass

    async def close(self) -> None:
        self._closing = True
        self._ready.clear()
        await self._close_conn()


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
