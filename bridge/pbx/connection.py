"""The bridge's WebSocket connection to the PBX: each message handed over in the callback that
read it.

websockets' asyncio connection queues every message for ``recv``: the bytes are read off the
socket in one turn of the event loop, and the task waiting in ``recv`` gets them in a later
turn, behind whatever else the loop has queued by then (the publisher's writes, a confirm just
read, another session's events). For the login that is fine. For a Signaling message, which
the PBX's call waits on, it is not: once a session has **taken** the connection
(:meth:`PbxConnection.take`), every message goes straight to the session's function, inside
the ``data_received`` callback that parsed it, and the session forwards it there
(:meth:`PbxConnection.forward`, a write to the transport with no await). Nothing the loop has
queued runs before a forward, and a message costs no task switch.

What ``recv`` did, done here for the messages taken:

- **the kind of frame**: the taker learns whether a message came as a binary frame, so that a
  forward goes out as the same kind (a binary frame may hold bytes that are not UTF-8; sent as
  a text frame they make an RFC 6455 peer fail the connection, 1007);
- **fragments** are put together (websockets' protocol bounds the whole message by
  ``max_size``; at most ``MAX_FRAGMENTS`` fragments, as websockets' own reader, else the
  connection is closed with 1009);
- **flow control**: a forward does not wait for the transport's buffer to drain, so while it is
  over its high-water mark (a PBX that does not read what it is sent) the connection stops
  reading from the PBX until it has drained, as a reader awaiting ``send`` would; a buffer that
  stays full for a ping timeout ends the connection (the keepalive cannot: its ping waits for
  the drain first), and a close is bounded by the close timeout for the same reason;
- **messages that came before the take** (with the login's last frame) are handed over first,
  in order;
- **a failure** (:meth:`PbxConnection.fail`, a session that cannot go on): the connection is
  closed with the code given, and what comes until the close is done is read and dropped, so
  that the peer's answering close frame is read too.

A websockets upgrade that changes ``Assembler`` (``recv_messages.frames``) fails
``tests/unit/test_pbx_connection.py``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.messages import MAX_FRAGMENTS
from websockets.asyncio.server import ServerConnection
from websockets.frames import BINARY, CONT, TEXT, CloseCode, Frame
from websockets.protocol import OPEN

if TYPE_CHECKING:  # what the mixin is mixed into (at run time it derives from object)
    from websockets.asyncio.connection import Connection as _Connection
else:
    _Connection = object

log = logging.getLogger("bridge.pbx")

#: takes one message: its bytes, and whether it came as a binary frame
Taker = Callable[[bytes, bool], None]

#: a write buffer full this long (the PBX reads nothing) ends the connection, when the
#: connection has no ping timeout of its own (it has: the keepalive's, 20 s)
STALL_S = 20.0


def ws_max_size(max_frame_bytes: int) -> int:
    """The WebSocket layer's limit: twice the frame limit. A frame a little over the limit is
    counted as a bad frame by ``decode`` and the session goes on; only a frame over twice the
    limit ends the session (the memory bound against a hostile peer)."""
    return 2 * max_frame_bytes


class PbxConnection(_Connection):
    """Mixin for the bridge's PBX connections (client and server mode): messages queue for
    ``recv`` until :meth:`take`, then each goes to the taker as it is read (module docstring).
    Also spreads the keepalive pings of sessions opened together (:meth:`keepalive`)."""

    _taker: Taker | None = None
    #: the fragments of a message being put together (taken messages only)
    _parts: list[Frame] | None = None
    #: the task closing the connection after :meth:`fail`
    _failing: asyncio.Task | None = None
    #: reading paused here while the transport's buffer is full (resumed once it has drained)
    _held = False
    #: ends the connection if the transport's buffer stays full (:meth:`_stalled`)
    _stall: asyncio.TimerHandle | None = None

    @property
    def serving(self) -> bool:
        """Messages are taken, the connection is open and has not failed."""
        return self._taker is not None and self._failing is None and self.protocol.state is OPEN

    def take(self, taker: Taker | None) -> None:
        """Hand every message to ``taker`` from now on, those queued for ``recv`` first (None:
        queue them for ``recv`` again, a session that ended)."""
        self._taker = taker
        if taker is None:
            self._read_again()
            return
        queued = self.recv_messages.frames.queue  # arrived before the take: theirs is the turn
        while queued and self._taker is not None:
            self._take(queued.popleft())
        self.recv_messages.maybe_resume()  # the queue may have paused reading when it was full
        if self.paused:  # the transport's buffer is full now: read again once it has drained
            self._hold()

    def process_event(self, event) -> None:
        if self._taker is not None and event.__class__ is Frame and (
                event.opcode is TEXT or event.opcode is BINARY or event.opcode is CONT):
            self._take(event)
        else:  # the handshake, control frames, messages before the take
            super().process_event(event)

    def _take(self, frame: Frame) -> None:
        parts = self._parts
        if frame.opcode is CONT:
            if parts is None:  # the protocol does not let a CONT frame start a message
                return
            parts.append(frame)
            if len(parts) > MAX_FRAGMENTS:  # as websockets' reader: 4,096 frames at most
                self.fail(CloseCode.MESSAGE_TOO_BIG, "too many fragments")
                return
            if not frame.fin:
                return
            self._parts = None
            data = b"".join(f.data for f in parts)
            binary = parts[0].opcode is BINARY
        elif not frame.fin:
            self._parts = [frame]
            return
        else:
            payload = frame.data
            # a masked frame's payload (server mode) may come as a bytearray
            data = payload if payload.__class__ is bytes else bytes(payload)
            binary = frame.opcode is BINARY
        taker = self._taker
        assert taker is not None
        taker(data, binary)

    def forward(self, data: bytes, binary: bool) -> bool:
        """Send ``data`` as one message, binary or text, now: written to the transport, no
        await (flow control: :meth:`pause_writing`). False if the connection is not open any
        more (closing: nothing is sent)."""
        protocol = self.protocol
        if protocol.state is not OPEN or self.transport.is_closing():  # (aborted: still OPEN)
            return False
        if binary:
            protocol.send_binary(data)
        else:
            protocol.send_text(data)
        try:
            self.send_data()
        except Exception as exc:  # as websockets' send: the connection is done for
            self.set_connection_exc(exc)
            self.transport.abort()
            return False
        return True

    def fail(self, code: int, reason: str) -> None:
        """Close the connection (a message that cannot be taken, a session that cannot go on);
        the close runs on a task of its own. Messages that come until it is done are read and
        dropped: reading must go on, or the peer's answering close frame would wait unread
        (behind a full queue, or a paused read) until the close timed out into an abort."""
        self._taker = _drop
        self._parts = None
        if self._failing is None:
            self._failing = asyncio.get_running_loop().create_task(self.close(code, reason))

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """websockets' close, bounded: its close timeout starts only once what waits to be
        written has drained, which a PBX that reads nothing never lets happen (a PBX's new
        connection in server mode waits for the old one's close). Past the close timeout the
        connection is aborted."""
        try:
            async with asyncio.timeout(self.close_timeout or STALL_S):
                await super().close(code, reason)
        except TimeoutError:
            self.transport.abort()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._taker is not None:  # forwards do not wait for the drain: stop reading instead
            self._hold()
        if self._stall is None:
            self._stall = self.loop.call_later(self.ping_timeout or STALL_S, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._read_again()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().connection_lost(exc)

    def _stalled(self) -> None:
        """Nothing could be written for a ping timeout: the PBX reads nothing. The keepalive
        cannot tell (its ping waits for the drain before its own timeout starts), so the
        connection is aborted here; the session ends and the device reconnects."""
        self._stall = None
        log.warning("PBX connection: nothing could be written for %g s (the PBX reads nothing); "
                    "dropped", self.ping_timeout or STALL_S)
        self.transport.abort()

    def _hold(self) -> None:
        if not self._held:
            self._held = True
            self.transport.pause_reading()

    def _read_again(self) -> None:
        if self._held:
            self._held = False
            self.transport.resume_reading()

    async def keepalive(self) -> None:
        """websockets' keepalive (a ping every ``ping_interval``; the connection fails when no
        pong comes within ``ping_timeout``), its first ping put off by a random part of the
        interval. Sessions opened together (the bridge's start, the PBX back after a restart)
        would otherwise ping in one burst every interval, in one turn of the event loop that
        forwarding then waits behind (100 sessions: a cluster in the benchmark's forwarding tail
        every 20 s). The first ping comes one to two intervals after the open."""
        if self.ping_interval is not None:
            await asyncio.sleep(random.uniform(0, self.ping_interval))
        await super().keepalive()


def _drop(data: bytes, binary: bool) -> None:
    """The taker of a failed connection."""


class PbxClientConnection(PbxConnection, ClientConnection):
    """The bridge's connection to the PBX in client mode."""


class PbxServerConnection(PbxConnection, ServerConnection):
    """The PBX's connection to the bridge in server mode."""
