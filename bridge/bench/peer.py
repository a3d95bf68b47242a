"""``python -m bridge.bench.peer``: the hand-written peer of issue 19.

What a user would write in an afternoon instead of the bridge, as the issue describes it: stdlib
``json``, one WebSocket session per device (``EPSIGNAL_DEVICES``) to ``EPSIGNAL_PBX_URL`` with the
project's login helper (:class:`bridge.protocol.login.ClientLogin`, as the load generator expects
it), then for every Signaling frame: send it back unchanged, then publish it to a topic exchange
(``EPSIGNAL_EVENTS_EXCHANGE``) with aio-pika, awaiting the publisher confirm of each message, one
channel. One event per frame (``call.signaling``, the frame's sig in it). No buffer, no call
state, no reconnects, no metrics: the benchmark compares the bridge with it per frame.
"""

import asyncio
import json
import os
import signal

import aio_pika
import websockets

from bridge.protocol import messages as m
from bridge.protocol.login import ClientLogin


async def session(url, app, password, hw, exchange):
    ws = await websockets.connect(url, compression=None, ping_interval=None)
    login = ClientLogin(app, password)
    await ws.send(m.encode(login.start()).decode())
    challenge = m.decode(await ws.recv(decode=False))
    assert isinstance(challenge, m.AppChallengeResult), challenge
    await ws.send(m.encode(login.on_challenge(challenge)).decode())
    result = m.decode(await ws.recv(decode=False))
    assert isinstance(result, m.AppLoginResult), result
    login.on_result(result)
    await ws.send(json.dumps({"mt": "Attach", "api": "EpSignal", "hw": hw, "src": hw}))
    n = 0
    async for text in ws:
        msg = json.loads(text)
        if msg.get("mt") != "Signaling":
            continue
        await ws.send(text)  # forward first, unchanged
        n += 1
        body = json.dumps({"hw": hw, "call": msg.get("call"), "to": msg.get("to", False), "sig": msg.get("sig")})
        await exchange.publish(aio_pika.Message(
            body.encode(), content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            type="call.signaling", message_id=f"{hw}/{n}"), f"device.{hw}.call.{msg.get('call')}.signaling")


async def main():
    env = os.environ
    conn = await aio_pika.connect(env["EPSIGNAL_AMQP_URL"])
    channel = await conn.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(env["EPSIGNAL_EVENTS_EXCHANGE"], "topic", durable=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(session(env["EPSIGNAL_PBX_URL"], env.get("EPSIGNAL_PBX_APP", "epsignal"),
                                         env["EPSIGNAL_PBX_PASSWORD"], hw, exchange))
             for hw in env["EPSIGNAL_DEVICES"].split(",") if hw]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
