"""A hostile PBX that sends far more than the bridge's bounds (issue 13, section 5), against a
bridge process of its own (so that its RSS is the bridge's alone):

- overlap dialing without end: ``info`` frames of 20 kB each carrying more digits of the same
  call's number (the number used to grow without limit and be published whole each time);
- tens of thousands of call ids that are never released (they used to stay tracked for good);
- an ``AttachResult`` whose ``err`` is 200 kB (it used to be written as one 200 kB log line).

The bridge's RSS after a first round of each (the allocator's high-water mark for a burst) must
stay flat through two more rounds; every ``call.state`` event stays small; every log line stays
short. The figures are printed (``pytest -s``) for docs/RELIABILITY.md.
"""

from __future__ import annotations

import json

import aiohttp
import pytest
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from bridge.device import MAX_ATTACH_TEXT
from bridge.logs import MAX_EXC_CHARS, MAX_MSG_CHARS
from bridge.protocol import messages as m
from bridge.protocol.callstate import MAX_NUM, MAX_TEXT
from bridge.protocol.login import ServerLogin
from tests.faults.fakepbx import FakePbx, FakeSession
from tests.faults.helpers import BridgeProcess, bridge_env, eventually
from tests.ports import free_port

pytestmark = pytest.mark.broker

HW = "009033400001"
HW_REFUSED = "009033400002"
PASSWORD = "fake-pbx-pw"
#: per round: info frames of DIGITS digits on one outgoing call, and call ids never released
#: (each with a number of 400 digits, a sip and a name of 600 characters), in batches
INFO_FRAMES, DIGITS, CALL_IDS = 150, 20_000, 5_000
BATCH, INFO_BATCH = 1000, 50
ROUNDS = 3
ERR_CHARS = 200_000
#: RSS growth allowed from the end of the first round to the end of the last (before the fix a
#: round of never-released calls added 11 MB, and 150 info frames took RSS to 304 MB)
RSS_SLACK_KB = 6 * 1024


class RefusingPbx(FakePbx):
    """The fake PBX, except that it refuses the Attach of HW_REFUSED with a 200 kB ``err``."""

    async def _handler(self, ws: ServerConnection) -> None:
        login = ServerLogin(dict(self.passwords))
        try:
            req = m.decode(await ws.recv(decode=False))
            await ws.send(m.encode(login.on_challenge_request(req)), text=True)
            await ws.send(m.encode(login.on_login(m.decode(await ws.recv(decode=False)))), text=True)
            attach = m.decode(await ws.recv(decode=False), max_bytes=1 << 20)
            if attach.hw == HW_REFUSED:
                await ws.send(m.encode(m.AttachResult(src=attach.src, err="E" * ERR_CHARS)), text=True)
                await ws.wait_closed()
                return
            await ws.send(m.encode(m.AttachResult(src=attach.src)), text=True)
            await ws.send(m.encode(m.Attached(src=attach.src)), text=True)
            s = FakeSession(ws, attach.hw, attach.src)
            self.sessions.append(s)
            self.new_session.set()
            async for _ in ws:  # the forwards: read and dropped (the test does not need them)
                pass
        except ConnectionClosed:
            pass


def frame(call: int, sig: dict, to: bool = False) -> bytes:
    msg = {"api": "EpSignal", "mt": "Signaling", "src": HW, "call": call, "sig": sig}
    if to:
        msg["to"] = True
    return json.dumps(msg).encode()


async def buffered(http: aiohttp.ClientSession, url: str) -> bool:
    """True when the bridge's buffer is empty (every event confirmed)."""
    async with http.get(url) as r:
        text = await r.text()
    return any(line == "epsignal_buffer_events 0.0" for line in text.splitlines())


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.fixture
async def refusing_pbx():
    fake = await RefusingPbx(PASSWORD).start()
    yield fake
    await fake.stop()


@pytest.mark.timeout(180)
async def test_hostile_sizes_keep_the_bridge_rss_flat(refusing_pbx, names, bus, tmp_path):
    dialed = [1_000_000 + r for r in range(ROUNDS)]  # the overlap-dialing call of each round
    sentinel = 2_000_000  # a rel after each batch: once its event is out, the batch's are too
    flood = [10_000_000 + r * CALL_IDS for r in range(ROUNDS)]  # the first new call of each round
    q = await bus.bind(*[f"device.{HW}.call.{c}.state" for c in [*dialed, *flood, sentinel]],
                       f"device.{HW_REFUSED}.attach.failed")
    port = free_port()
    proc = BridgeProcess(bridge_env(names, pbx_url=refusing_pbx.url, pbx_password=PASSWORD,
                                    devices=f"{HW},{HW_REFUSED}", http_port=port), tmp_path).start()
    metrics = f"http://127.0.0.1:{port}/metrics"
    http = aiohttp.ClientSession()
    try:
        sess = await refusing_pbx.wait_session(timeout=15)
        seen = await q.until(lambda e: e.body["type"] == "attach.failed", timeout=15)
        refused = seen[-1]

        async def batch(frames) -> None:
            """Send, then wait until the bridge read them all and the broker confirmed their
            events: what is left in the bridge then is what it keeps, not what is in flight."""
            nonlocal seen
            for f in frames:
                await sess.send(f)
            await sess.send(frame(sentinel, {"type": "rel", "cau": {"num": 16}}, to=True))
            seen += await q.until(lambda e: e.body.get("call") == sentinel, timeout=60)
            await eventually(lambda: buffered(http, metrics), 60, "the buffer drained")

        digits = "7" * DIGITS
        rss = []
        for r in range(ROUNDS):
            await batch([frame(dialed[r], {"type": "setup", "cd": {"num": "0"}})])
            info = frame(dialed[r], {"type": "info", "cd": {"num": digits}})
            for _ in range(INFO_FRAMES // INFO_BATCH):
                await batch([info] * INFO_BATCH)
            for b in range(flood[r], flood[r] + CALL_IDS, BATCH):
                await batch([frame(c, {"type": "setup", "cg": {"num": f"{c}" * 50, "sip": "s" * 600},
                                       "fty": [{"type": "name_identification", "name": "n" * 600}]},
                                   to=True) for c in range(b, b + BATCH)])
            rss.append(rss_kb(proc.pid))
        states = [e for e in seen + q.drain() if e.body["type"] == "call.state"]
        assert not sess.closed.is_set() and proc.running()
    finally:
        await http.close()
        await proc.stop()
        proc.close_files()

    growth = rss[-1] - rss[0]
    dial_events = [e for e in states if e.body["call"] in dialed]
    biggest = max(len(json.dumps(e.body)) for e in states)
    lines = proc.stderr().splitlines()
    longest = max(len(line) for line in lines)
    print(f"\nFIGURES hostile-sizes: rounds={ROUNDS} info_frames_per_round={INFO_FRAMES}x{DIGITS}B "
          f"call_ids_per_round={CALL_IDS} rss_kb={rss} growth_kb={growth} "
          f"dialing_state_events={len(dial_events)} largest_state_event_B={biggest} "
          f"err_chars={ERR_CHARS} longest_log_line={longest} attach_failed_error={len(refused.body['error'])}")
    # the number stops at its bound: an event for the setup, one for the first info, none for
    # the others; then the flood of new calls pushes the call out (released, evicted)
    assert all(len(e.body["remote"].get("num", "")) <= MAX_NUM for e in dial_events)
    for c in dialed:
        got = [(e.body["state"], len(e.body["remote"]["num"]), e.body.get("evicted"))
               for e in dial_events if e.body["call"] == c]
        assert got == [("setup", 1, None), ("setup", MAX_NUM, None),
                       ("released", MAX_NUM, "too-many-calls")], got
    # a flooding call's strings are cut too (and it is pushed out by the calls after it)
    for c in flood:
        got = [e.body for e in states if e.body["call"] == c]
        assert [(b["state"], b.get("evicted")) for b in got] == [("setup", None), ("released", "too-many-calls")]
        assert {k: len(v) for k, v in got[0]["remote"].items()} == {"num": MAX_NUM, "sip": MAX_TEXT, "dn": MAX_TEXT}
    assert biggest < 2 * (MAX_NUM + 2 * MAX_TEXT)
    # the 200 kB err: one short log line, and a bounded error in the event
    assert len(refused.body["error"]) <= MAX_ATTACH_TEXT
    assert longest < MAX_MSG_CHARS + MAX_EXC_CHARS + 1000, longest
    assert any("chars cut" in line and HW_REFUSED in line for line in lines)
    # and the memory: flat after the first round
    assert growth < RSS_SLACK_KB, rss
