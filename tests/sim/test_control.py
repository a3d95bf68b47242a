"""The HTTP control API."""

from __future__ import annotations

import aiohttp
import pytest

from bridge.protocol.messages import Attached, Detached, Signaling
from tests.sim.helpers import App


@pytest.fixture
async def ctl(make_sim):
    sim = await make_sim(control=True, devices=3, unregistered=1)
    async with aiohttp.ClientSession(base_url=sim.control_url) as http:
        yield sim, http


async def call(http, method, path, **kw):
    async with http.request(method, path, **kw) as r:
        return r.status, await r.json()


async def test_place_call_and_device_info(ctl):
    sim, http = ctl
    hw = sim.hw(1)
    status, body = await call(http, "POST", f"/devices/{hw}/calls",
                              json={"direction": "out", "remote": "202", "answer": True,
                                    "hold_s": 30})
    assert status == 200 and body == {"call": 1}
    status, dev = await call(http, "GET", f"/devices/{hw}")
    assert status == 200
    assert (dev["registered"], dev["attached"]) == (True, False)
    assert [c["call"] for c in dev["calls"]] == [1]
    assert dev["calls"][0]["in"] is False and dev["calls"][0]["remote"]["num"] == "202"


async def test_place_call_with_defaults_completes(ctl):
    sim, http = ctl
    status, body = await call(http, "POST", f"/devices/{sim.hw(2)}/calls", json={"hold_s": 0.02})
    assert status == 200 and body == {"call": 1}
    await sim.wait_idle(2)
    status, st = await call(http, "GET", "/stats")
    assert status == 200 and st["calls_completed"] == 1
    assert set(st) >= {
        "sessions", "logins_ok", "logins_failed", "attached_devices", "registered_devices",
        "calls_started", "calls_completed", "calls_stalled", "calls_active", "app_calls",
        "messages_forwarded", "bad_frames", "bad_signaling", "attach_conflicts", "forward_rtt_us"}
    assert st["forward_rtt_us"] == {"p50": None, "p99": None, "count": 0}


async def test_register_unregister(ctl):
    sim, http = ctl
    hw = sim.hw(4)
    app = await App.logged_in(sim.url)
    assert not (await app.attach(hw, src="h")).failed
    reg = await call(http, "POST", f"/devices/{hw}/register")
    assert reg == (200, {"hw": hw, "registered": True})
    assert isinstance(await app.recv(), Attached)
    unreg = await call(http, "POST", f"/devices/{hw}/unregister")
    assert unreg == (200, {"hw": hw, "registered": False})
    assert isinstance(await app.recv(), Detached)
    status, dev = await call(http, "GET", f"/devices/{hw}")
    assert status == 200 and (dev["registered"], dev["attached"]) == (False, True)


async def test_sessions_drop_and_garbage(ctl):
    sim, http = ctl
    app = await App.logged_in(sim.url)
    assert await call(http, "POST", "/sessions/garbage", json={"count": 3}) == (200, {"sent": 3})
    for _ in range(3):
        await app.recv_raw()
    assert await call(http, "POST", "/sessions/drop") == (200, {"dropped": 1})
    assert await call(http, "POST", "/sessions/drop") == (200, {"dropped": 0})


async def test_faults(ctl):
    sim, http = ctl
    assert await call(http, "POST", "/faults", json={"refuse_logins": True, "delay_ms": 20}) == (
        200, {"refuse_logins": True, "delay_ms": 20})
    app = await App.open(sim.url)
    assert (await app.login("epsignal", "secret")).ok is False
    assert await call(http, "POST", "/faults", json={"refuse_logins": False}) == (
        200, {"refuse_logins": False, "delay_ms": 20})
    assert sim.faults.delay_ms == 20 and sim.faults.refuse_logins is False


@pytest.mark.parametrize("method, path, kw, status, needle", [
    ("POST", "/devices/009033409999/calls", {"json": {}}, 404, "unknown device '009033409999'"),
    ("GET", "/devices/nope", {}, 404, "unknown device 'nope'"),
    ("POST", "/devices/nope/register", {}, 404, "unknown device"),
    ("POST", "/devices/{hw1}/calls", {"data": b"{not json"}, 400, "not JSON"),
    ("POST", "/devices/{hw1}/calls", {"json": {"answer": "yes"}}, 400, "`$.answer`"),
    ("POST", "/devices/{hw1}/calls", {"json": {"direction": "up"}}, 400, "`$.direction`"),
    ("POST", "/devices/{hw1}/calls", {"json": {"hold_s": -1}}, 400, "`$.hold_s`"),
    ("POST", "/devices/{hw1}/calls", {"json": {"colour": "red"}}, 400, "colour"),
    ("POST", "/devices/{hw1}/calls", {"json": [1]}, 400, "Expected `object`"),
    ("POST", "/devices/{hw4}/calls", {"json": {}}, 409, "not registered"),
    ("POST", "/faults", {"json": {"delay_ms": "slow"}}, 400, "`$.delay_ms`"),
    ("POST", "/sessions/garbage", {"json": {"count": 0}}, 400, "`$.count`"),
    ("GET", "/nowhere", {}, 404, "Not Found"),
    ("GET", "/faults", {}, 405, "Method Not Allowed"),
])
async def test_bad_requests(ctl, method, path, kw, status, needle):
    sim, http = ctl
    path = path.format(hw1=sim.hw(1), hw4=sim.hw(4))
    got_status, body = await call(http, method, path, **kw)
    assert got_status == status
    assert needle in body["error"]
    assert sim.stats()["calls_started"] == 0


async def test_call_through_control_reaches_attached_app(ctl):
    sim, http = ctl
    app = await App.logged_in(sim.url)
    await app.attach(sim.hw(3), src="c")
    assert isinstance(await app.recv(), Attached)
    status, body = await call(http, "POST", f"/devices/{sim.hw(3)}/calls", json={"busy": True})
    assert status == 200
    setup = await app.recv()
    assert isinstance(setup, Signaling) and setup.call == body["call"]
    assert setup.signal.type == "setup"
