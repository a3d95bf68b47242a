"""The publisher's own AMQP encoding is byte for byte what aio-pika + pamqp send."""

from __future__ import annotations

from datetime import timedelta

import aio_pika
import pytest
from aio_pika import DeliveryMode
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from bridge.amqp.wire import Wire
from bridge.events import EventFactory, Outgoing


def reference(ev: Outgoing, exchange: str, channel: int, max_body: int) -> bytes:
    """What ``EventPublisher`` sent through ``aio_pika.Exchange.publish`` before."""
    msg = aio_pika.Message(
        ev.body, content_type="application/json", delivery_mode=DeliveryMode.PERSISTENT,
        message_id=ev.message_id, timestamp=ev.timestamp, type=ev.type,
        app_id="epsignal-bridge", headers=ev.headers or {},
    )
    body = ev.body
    chunks = [body] if len(body) < max_body else [body[i:i + max_body] for i in range(0, len(body), max_body)]
    frames = [spec.Basic.Publish(exchange=exchange, routing_key=ev.key, mandatory=True),
              ContentHeader(properties=msg.properties, body_size=len(body))]
    frames += [ContentBody(c) for c in chunks]
    return ChannelFrame.marshall(channel_number=channel, frames=frames).payload


def events() -> list[Outgoing]:
    f = EventFactory("bench-x")
    out = [f.detached("009033400001", "command"), f.detached("h\u00e9.w", "shutdown"),
           f.gap("buffer-full", {"a": [(1, 3)]})]
    traced = f.detached("hw2", "command")
    traced.headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                      "tracestate": "k=v"}
    out.append(traced)
    big = f.detached("hw3", "x" * 300_000)
    out.append(big)
    return out


@pytest.mark.parametrize("i", range(5))
def test_wire_is_what_aio_pika_sends(i):
    ev = events()[i]
    for channel, max_body in ((1, 131064), (7, 4088)):
        w = Wire(channel, "epsignal.events", max_body)
        assert w.encode(ev) == reference(ev, "epsignal.events", channel, max_body)


def test_body_exactly_one_frame_long_is_split_like_aiormq():
    ev = events()[0]
    n = len(ev.body)
    w = Wire(1, "x", n)
    assert w.encode(ev) == reference(ev, "x", 1, n)


def test_wire_refuses_what_amqp_cannot_carry():
    ev = events()[0]
    ev.key = "device." + "a" * 300 + ".detached"
    with pytest.raises(ValueError):
        Wire(1, "x", 131064).encode(ev)
    ev = events()[0]
    ev.message_id = "i/" + "b" * 300 + "/1"
    with pytest.raises(ValueError):
        Wire(1, "x", 131064).encode(ev)


def test_timestamps_are_aware_utc_datetimes():
    # the wire packs timestamp.timestamp(): a naive datetime would be read as local time
    assert all(ev.timestamp.utcoffset() == timedelta(0) for ev in events())

