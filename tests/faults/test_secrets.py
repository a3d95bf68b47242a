"""No secret leaves the bridge: a full run of a bridge process with distinctive secrets (the PBX
password, the password of an AMQP user made for the test, the TURN passwords the PBX hands out
at attach), through attach, calls, commands good and bad, a wrong PBX password, a wrong AMQP
password and a broker cut; then everything the bridge wrote is searched for each secret: its
logs, every event (body and headers), every reply, every dead-lettered command, /metrics and
/readyz.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import types
import uuid
from urllib.parse import quote

import aio_pika
import aiohttp
import pytest

from bridge.sim import PbxSimulator, SimConfig
from bridge.sim import dispatch as sim_dispatch
from tests.faults.helpers import (
    AMQP_URL, bridge_env, BridgeProcess, eventually, http_get, need_rabbitmqctl,
    publish_command, Replies,
)
from tests.ports import free_port
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.broker

PBX_PASSWORD = "pbx-S3cret-XYZ"
PBX_WRONG = "pbx-Wr0ng-S3cret-QQ"


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def amqp_user():
    need_rabbitmqctl()
    tag = uuid.uuid4().hex[:8]
    user, pw = f"epsig-{tag}", f"amqp-S3cret-{tag}-Qz"
    rabbitmqctl("add_user", user, pw)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, pw
    finally:
        rabbitmqctl("delete_user", user)


@pytest.fixture
def turn_passwords(monkeypatch):
    """The simulator's AttachResult turnPwd (bridge/sim/dispatch.py on_attach draws it from
    secrets.token_urlsafe): recorded, and made distinctive."""
    made: list[str] = []

    def token_urlsafe(n: int = 12) -> str:
        made.append(f"turnS3cret{uuid.uuid4().hex[:12]}")
        return made[-1]

    monkeypatch.setattr(sim_dispatch, "secrets", types.SimpleNamespace(token_urlsafe=token_urlsafe))
    return made


@pytest.mark.timeout(180)
async def test_no_secret_in_anything_the_bridge_writes(names, bus, amqp_user, turn_passwords, tmp_path):
    user, amqp_pw = amqp_user
    amqp_wrong = "amqp-Wr0ng-S3cret-Zz"
    sim = PbxSimulator(SimConfig(password=PBX_PASSWORD, devices=6, ring_s=0.05, stall_timeout_s=3.0, seed=3))
    await sim.start()
    proxy = await TcpProxy("127.0.0.1", 5672).start()
    conn = await aio_pika.connect(AMQP_URL)
    written: list[tuple[str, bytes]] = []  # (where, what the bridge wrote)
    procs: list[BridgeProcess] = []
    q = await bus.bind("#")  # every event, bound before the bridge starts
    hws = [sim.hw(1), sim.hw(2)]
    url = f"amqp://{user}:{amqp_pw}@127.0.0.1:{proxy.port}/"

    def start(**kw) -> tuple[BridgeProcess, int]:
        port = free_port()
        env = bridge_env(names, pbx_url=sim.url, log_level="DEBUG", http_port=port, login_retry_s=1.0, **kw)
        p = BridgeProcess(env, tmp_path, name=f"phase{len(procs)}").start()
        procs.append(p)
        return p, port

    async def scrape(port: int, phase: str) -> None:
        for path in ("/metrics", "/readyz", "/healthz"):
            status, text = await http_get(port, path)
            written.append((f"{phase} {path} ({status})", text.encode()))

    try:
        # ---------------------------------------------------------------- phase 1: a full run
        p1, port1 = start(pbx_password=PBX_PASSWORD, amqp_url=url, devices=",".join(hws))
        await eventually(lambda: sim.stats()["attached_devices"] == 2, 15, "attached")
        replies = await Replies(conn).open()
        ex = await (await conn.channel()).get_exchange(names["commands_exchange"], ensure=True)
        await eventually(lambda: _consumers(conn, names["commands_queue"]), 10, "consuming")
        cid = await publish_command(ex, f"device.{sim.hw(3)}.attach", b"", reply_to=replies.name)
        assert (await replies.get(cid))["ok"] is True
        for hw in hws:
            await sim.place_call(hw, direction="in", hold_s=0.1)
        for body in ({"call": -1, "sig": {"type": "setup", "cd": {"num": "201"}}},
                     {"call": -1, "sig": {"type": "rel", "cau": {"num": 16}}}):
            cid = await publish_command(ex, f"device.{hws[0]}.signaling", body, reply_to=replies.name)
            assert (await replies.get(cid))["ok"] is True
        bad = [(f"device.{hws[0]}.signaling", b"{nope"), (f"device.{hws[0]}.signaling", b'{"call":"x","sig":{}}'),
               (f"device.{sim.hw(5)}.signaling", b'{"call":-1,"sig":{"type":"setup"}}'),
               ("totally.wrong", b"{}"), (f"device.{hws[0]}.explode", b"{}"), ("device.nosuch.attach", b"")]
        for key, body in bad:
            cid = await publish_command(ex, key, body, reply_to=replies.name)
            assert (await replies.get(cid))["ok"] is False
        cid = await publish_command(ex, f"device.{sim.hw(3)}.detach", b"", reply_to=replies.name)
        assert (await replies.get(cid))["ok"] is True
        await sim.wait_idle(10)
        await scrape(port1, "phase 1 up")
        # a broker cut: connection errors, readiness down, events buffered meanwhile
        proxy.cut()
        await eventually(lambda: _status(port1, "/readyz", 503), 10, "/readyz 503 after the cut")
        call = await sim.place_call(hws[1], direction="out", hold_s=0.1)
        await sim.wait_idle(10)
        await asyncio.sleep(1.5)  # a few reconnect attempts against the closed proxy
        await scrape(port1, "phase 1 broker cut")
        proxy.restore()
        await eventually(lambda: _status(port1, "/readyz", 200), 15, "/readyz 200 after the restore")
        await scrape(port1, "phase 1 restored")
        assert await p1.stop() == 0
        logs1 = p1.stderr()
        assert "broker connection lost" in logs1 or "unreachable" in logs1
        assert sim.stats()["calls_stalled"] == 0 and call

        # ---------------------------------------------------------------- phase 2: wrong PBX password
        failed0 = sim.stats()["logins_failed"]
        p2, port2 = start(pbx_password=PBX_WRONG, amqp_url=url, devices=",".join(hws))
        await eventually(lambda: sim.stats()["logins_failed"] >= failed0 + 4, 10, "refused logins")
        await p2.wait_log(lambda r: r.get("level") == "ERROR" and "refused" in r.get("msg", ""), 10)
        await scrape(port2, "phase 2 wrong PBX password")
        await p2.stop()

        # ---------------------------------------------------------------- phase 3: wrong AMQP password
        bad_url = f"amqp://{user}:{amqp_wrong}@127.0.0.1:5672/"
        p3, port3 = start(pbx_password=PBX_PASSWORD, amqp_url=bad_url, devices=hws[0])
        await p3.wait_log(lambda r: "unreachable" in r.get("msg", ""), 15)
        await scrape(port3, "phase 3 wrong AMQP password")
        await p3.stop(timeout=15)

        # ---------------------------------------------------------------- what the bridge wrote
        for p in procs:
            written.append((f"{p.stderr_path.name} (stderr+stdout)", p.output()))
        await asyncio.sleep(0.5)
        events = q.drain()
        assert len(events) > 20
        for e in events:
            m = e.message
            written.append((f"event {e.key}", m.body + repr(m.headers).encode() + repr(m.properties).encode()))
        for body, headers, props in replies.raw:
            written.append(("reply", body + repr(headers).encode() + props.encode()))
        dead = await bus.dead_letters(len(bad), timeout=10)
        for m in dead:
            written.append(("dead letter", m.body + repr(m.headers).encode() + repr(m.properties).encode()))

        assert len(turn_passwords) >= 3  # the PBX did hand out TURN passwords
        secrets = {
            "PBX password": PBX_PASSWORD, "wrong PBX password": PBX_WRONG,
            "AMQP password": amqp_pw, "wrong AMQP password": amqp_wrong,
            "AMQP URL": url, "wrong AMQP URL": bad_url,
            **{f"turnPwd {i}": t for i, t in enumerate(turn_passwords)},
        }
        for name, value in list(secrets.items()):
            if quote(value, safe="") != value:
                secrets[name + " (percent-encoded)"] = quote(value, safe="")
            secrets[name + " (JSON-escaped)"] = json.dumps(value)[1:-1]
        leaks = [(name, where) for where, data in written for name, value in secrets.items()
                 if value.encode() in data]
        assert leaks == [], leaks
        total = sum(len(d) for _, d in written)
        print(f"\nFIGURES secrets: searched={len(written)} outputs ({total} bytes: {len(procs)} process logs, "
              f"{len(events)} events, {len(replies.raw)} replies, {len(dead)} dead letters, "
              f"{sum(1 for w, _ in written if '/' in w and w.startswith('phase'))} HTTP answers) "
              f"secrets={len(secrets)} (turnPwd values: {len(turn_passwords)}) leaks=0")
    finally:
        for p in procs:
            p.kill()
            p.close_files()
        await proxy.stop()
        await sim.stop()
        await conn.close()


async def _consumers(conn, name) -> bool:
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(name, passive=True)
        n = q.declaration_result.consumer_count
        await ch.close()
        return n >= 1
    except aio_pika.exceptions.ChannelClosed:
        return False


async def _status(port: int, path: str, want: int) -> bool:
    try:
        return (await http_get(port, path))[0] == want
    except aiohttp.ClientError:
        return False
