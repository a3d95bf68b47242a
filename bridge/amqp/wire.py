"""The AMQP frames of one event, as bytes: pure encoding, no I/O (the publisher,
:mod:`bridge.amqp.publisher`, writes them to an aiormq channel; docs/PERFORMANCE.md).

``Wire.encode`` makes the same bytes pamqp makes for ``Basic.Publish`` with the properties the
bridge always sends; ``tests/unit/test_publisher_wire.py`` compares them.
"""

from __future__ import annotations

import struct
from typing import cast

from pamqp import encode as _pamqp_encode
from pamqp.common import FieldTable

from bridge.events import Outgoing

CONTENT_TYPE = "application/json"
APP_ID = "epsignal-bridge"


def _shortstr(s: str) -> bytes:
    b = s.encode()
    if len(b) > 255:
        raise ValueError(f"{s[:40]!r}...: longer than 255 bytes (AMQP short string)")
    return bytes((len(b),)) + b


_FRAME_END = b"\xce"
_pack_len = struct.Struct(">I").pack
_pack_header = struct.Struct(">HHQH").pack  # class, weight, body size, property flags
_pack_ts = struct.Struct(">Q").pack
# Basic.Properties flags of an event: content-type, headers, delivery-mode, priority (0, as
# aio-pika always sent it), message-id, timestamp, type, app-id (AMQP 0-9-1 order)
_FLAGS = 0x8000 | 0x2000 | 0x1000 | 0x0800 | 0x0080 | 0x0040 | 0x0020 | 0x0008
_EMPTY_TABLE = b"\x00\x00\x00\x00"


class Wire:
    """The AMQP frames of one event published to one exchange on one channel, as bytes.

    The same bytes pamqp makes for ``Basic.Publish(exchange, key, mandatory=True)`` and the
    properties ``EventPublisher`` always sent (content type, persistent, priority 0, message id,
    timestamp, type, app id, headers), checked by ``tests/unit/test_publisher_wire.py``."""

    def __init__(self, channel: int, exchange: str, max_body: int) -> None:
        """``max_body``: the largest body in one frame (aiormq's ``max_content_size``)."""
        ch = struct.pack(">H", channel)
        self._method = b"\x01" + ch
        self._header = b"\x02" + ch
        self._body = b"\x03" + ch
        self._publish = struct.pack(">HHH", 60, 40, 0) + _shortstr(exchange)
        self.max_body = max_body
        self._ct = _shortstr(CONTENT_TYPE)
        self._app = _shortstr(APP_ID)
        #: the method payload without the key: class, method, ticket, exchange; + key length, bits
        self._publish_len = len(self._publish) + 2
        #: the content header payload without headers, message id and type
        self._fixed_props = 14 + len(self._ct) + 2 + 1 + 8 + len(self._app)
        self._types: dict[str, bytes] = {}
        self._headers: dict | None = None  # the last headers table encoded, and its bytes
        self._table = _EMPTY_TABLE

    def encode(self, ev: Outgoing) -> bytes:
        """Raises ValueError for what AMQP cannot carry (a key or id over 255 bytes)."""
        key = ev.key.encode()
        kl = len(key)
        if kl > 255:
            raise ValueError(f"routing key over 255 bytes: {ev.key[:40]!r}...")
        mid = ev.message_id.encode()
        if len(mid) > 255:
            raise ValueError(f"{ev.message_id[:40]!r}...: longer than 255 bytes (AMQP short string)")
        typ = self._types.get(ev.type)
        if typ is None:
            typ = self._types[ev.type] = _shortstr(ev.type)
        table = ev.headers
        if not table:
            headers = _EMPTY_TABLE
        elif table is self._headers:  # the events of one frame share their (trace) headers
            headers = self._table
        else:
            self._headers, headers = table, _pamqp_encode.field_table(cast(FieldTable, table))
            self._table = headers
        body = ev.body
        n = len(body)
        # content header payload: 14 bytes + content type + headers + 2 (delivery mode,
        # priority) + message id + 8 (timestamp) + type + app id
        plen = self._fixed_props + len(headers) + len(mid) + len(typ)
        parts = [self._method, _pack_len(self._publish_len + kl), self._publish, bytes((kl,)), key,
                 b"\x01\xce",  # mandatory, not immediate; frame end
                 self._header, _pack_len(plen), _pack_header(60, 0, n, _FLAGS), self._ct, headers,
                 b"\x02\x00", bytes((len(mid),)), mid, _pack_ts(int(ev.timestamp.timestamp())), typ,
                 self._app, _FRAME_END]
        step = self.max_body
        if n < step:  # as aiormq splits
            parts += (self._body, _pack_len(n), body, _FRAME_END)
        else:
            for i in range(0, n, step):
                chunk = body[i:i + step]
                parts += (self._body, _pack_len(len(chunk)), chunk, _FRAME_END)
        return b"".join(parts)
