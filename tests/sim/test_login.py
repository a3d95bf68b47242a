"""Login: challenge, digest verification, failures close the socket."""

from __future__ import annotations

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.asyncio.client import connect

from bridge.protocol.messages import AppChallenge, AppChallengeResult, Attach, encode
from tests.sim.helpers import App


async def test_login_ok(sim):
    app = await App.open(sim.url)
    await app.send(AppChallenge(src="c1"))
    challenge = await app.recv()
    assert isinstance(challenge, AppChallengeResult)
    assert challenge.src == "c1"
    assert 1 <= len(challenge.challenge) <= 16
    await app.close()
    app = await App.open(sim.url)
    result = await app.login("epsignal", "secret")
    assert result.ok is True
    s = sim.stats()
    assert (s["logins_ok"], s["logins_failed"], s["sessions"]) == (1, 0, 1)


async def test_fresh_challenge_each_time(sim):
    app = await App.open(sim.url)
    got = set()
    for _ in range(3):
        await app.send(AppChallenge())
        got.add((await app.recv()).challenge)
    assert len(got) == 3


@pytest.mark.parametrize("name, password", [("epsignal", "wrong"), ("other", "secret")])
async def test_login_failed_closes(sim, name, password):
    app = await App.open(sim.url)
    result = await app.login(name, password)
    assert result.ok is False
    with pytest.raises(ConnectionClosed):
        await app.recv()
    assert app.ws.close_code == 1008
    s = sim.stats()
    assert (s["logins_ok"], s["logins_failed"], s["sessions"]) == (0, 1, 0)


async def test_refuse_logins_fault(sim):
    sim.faults.refuse_logins = True
    app = await App.open(sim.url)
    assert (await app.login("epsignal", "secret")).ok is False
    with pytest.raises(ConnectionClosed):
        await app.recv()
    sim.faults.refuse_logins = False
    app = await App.logged_in(sim.url)
    assert sim.stats()["logins_failed"] == 1 and sim.stats()["logins_ok"] == 1


async def test_epsignal_before_login_closes(sim):
    app = await App.open(sim.url)
    await app.send_raw(encode(Attach(hw=sim.hw(1), src="a")))
    with pytest.raises(ConnectionClosed):
        await app.recv()
    assert app.ws.close_code == 1008


async def test_login_without_challenge_fails(sim):
    from bridge.protocol.messages import AppLogin

    app = await App.open(sim.url)
    await app.send(AppLogin(app="epsignal", digest="00" * 32))
    assert (await app.recv()).ok is False
    with pytest.raises(ConnectionClosed):
        await app.recv()


async def test_other_paths_404(sim):
    url = sim.url.replace("/PBX0/APPS/websocket", "/other")
    with pytest.raises(InvalidStatus) as e:
        async with connect(url):
            pass
    assert e.value.response.status_code == 404
