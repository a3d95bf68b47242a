"""Issue 13, section 4: invalid UTF-8 and bad ids must not end a device's session.

With the real broker, the simulator (which fails a session on a text frame that is not UTF-8,
close 1007, as an RFC 6455 PBX does) and a hostile PBX (tests/faults/fakepbx.py):

- a command whose body is not UTF-8 is refused with the reason and dead-lettered; nothing
  reaches the PBX, the session stays up and carries the next command;
- a binary frame from the PBX (with bytes in its sig that are not UTF-8) is forwarded as a binary
  frame, byte for byte; the session stays up, and its events are valid JSON;
- commands for hw ids and call ids outside the documented syntax (bridge/ids.py) are refused
  with the reason and dead-lettered; no Attach for them reaches the PBX.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.faults.fakepbx import FakePbx
from tests.faults.helpers import eventually

pytestmark = pytest.mark.broker

FAKE_PASSWORD = "fake-pbx-pw"
FAKE_HW = "009033400001"


@pytest.fixture
async def fake_pbx():
    fake = await FakePbx(FAKE_PASSWORD).start()
    yield fake
    await fake.stop()


async def _attached(sim, bus, settings_for, start_bridge, n: int = 1):
    hws = [sim.hw(i) for i in range(1, n + 1)]
    bridge = await start_bridge(settings_for(sim, devices=",".join(hws)))
    await eventually(lambda: sim.stats()["attached_devices"] == n, 10, "the devices attached")
    return bridge, hws


def _session_of(bridge, hw):
    r = bridge.pbx.runners[hw]
    return r.session, r.reconnects


# ------------------------------------------------------------------------------- commands
async def test_a_command_that_is_not_utf8_is_refused_and_the_session_stays_up(sim, bus, settings_for, start_bridge):
    bridge, [hw] = await _attached(sim, bus, settings_for, start_bridge)
    session, reconnects = _session_of(bridge, hw)
    sig_events = await bus.bind(f"device.{hw}.call.*.signaling")

    body = b'{"call":6,"to":true,"sig":{"type":"info","dn":"\xc3"}}'  # the example
    t0 = time.monotonic()
    reply = await bus.command(hw, "signaling", body)
    refused_ms = (time.monotonic() - t0) * 1000
    assert reply["ok"] is False and reply["command"] == "signaling" and reply["hw"] == hw
    assert reply["error"] == ("signaling command body is not valid UTF-8 (byte 0xc3 at 47: invalid "
                              "continuation byte); JSON must be UTF-8")
    [dead] = await bus.dead_letters(1)
    assert dead.body == body and dead.routing_key == f"device.{hw}.signaling"
    assert dead.headers["x-epsignal-error"] == reply["error"]

    # nothing reached the PBX (a strict one: it would have failed the session, close 1007)
    s = sim.stats()
    assert (s["invalid_utf8"], s["bad_frames"], s["bad_signaling"], s["messages_injected"]) == (0, 0, 0, 0)
    # the same session, still attached, carries the next command: a call placed and released
    ok = await bus.command(hw, "signaling", {"call": -1, "sig": {"type": "setup", "cd": {"num": "201"}}})
    assert ok == {"ok": True, "v": 1, "command": "signaling", "hw": hw}
    assert (await bus.command(hw, "signaling", {"call": -1, "sig": {"type": "rel", "cau": {"num": 16}}}))["ok"]
    ev = await sig_events.get()
    assert ev.body["call"] == -1 and ev.body["origin"] == "command" and ev.body["sig"]["type"] == "setup"
    await eventually(lambda: sim.stats()["app_calls"] == 1, 5, "the call placed at the PBX")
    assert _session_of(bridge, hw) == (session, reconnects) and session.ws.serving
    assert sim.stats()["sessions"] == 1 and sim.stats()["invalid_utf8"] == 0
    assert bridge.consumer.stats.by_outcome.get(("signaling", "refused")) == 1
    print(f"\nFIGURES utf8-command: refused in {refused_ms:.0f} ms, dead-lettered 1, reconnects "
          f"{_session_of(bridge, hw)[1] - reconnects}, sim invalid_utf8 {sim.stats()['invalid_utf8']}, "
          "next command ok")


BAD_IDS = [
    # (routing key, body, what the reason says)
    ("device.*.attach", b"", "hw id '*' is not valid (character '*' at 0)"),
    ("device.%2A.attach", b"", "hw id '*' is not valid (character '*' at 0)"),
    ("device. .attach", b"", "hw id ' ' is not valid (character ' ' at 0)"),
    ("device.%ZZ.attach", b"", "hw id '%ZZ' is not valid (character '%' at 0)"),
    ("device.dev%231.detach", b"", "hw id 'dev#1' is not valid (character '#' at 3)"),
    ("device." + "9" * 65 + ".attach", b"", "it has 65 characters"),
    ("device.{hw}.signaling", b'{"call":1000000000000000000000000000000,"sig":{"type":"info"}}',
     "invalid signaling command: Expected `int` <= 2147483647 - at `$.call`"),
    ("device.{hw}.signaling", b'{"call":0,"sig":{"type":"setup"}}', "call id 0 names no call"),
]


async def test_bad_hw_and_call_ids_are_refused_with_the_reason(sim, bus, settings_for, start_bridge):
    bridge, [hw] = await _attached(sim, bus, settings_for, start_bridge)
    session, reconnects = _session_of(bridge, hw)
    for key, body, needle in BAD_IDS:
        key = key.format(hw=hw)
        reply = await bus.command("", "", body, key=key)
        assert reply["ok"] is False and needle in reply["error"], (key, reply)
        if "hw id" in needle or "characters" in needle:
            assert "hw" not in reply and "a hw id is 1 to 64 characters" in reply["error"], reply
        else:
            assert reply["hw"] == hw
    dead = await bus.dead_letters(len(BAD_IDS))
    by_key = {(d.routing_key, d.body): d.headers["x-epsignal-error"] for d in dead}
    for key, body, needle in BAD_IDS:
        assert needle in by_key[(key.format(hw=hw), body)]
    # no Attach for any of them reached the PBX, and the attached device kept its session
    assert set(bridge.pbx.runners) == {hw}
    s = sim.stats()
    assert (s["attached_devices"], s["bad_signaling"], s["app_calls"], s["invalid_utf8"]) == (1, 0, 0, 0)
    assert _session_of(bridge, hw) == (session, reconnects) and session.ws.serving
    print(f"\nFIGURES bad-ids: {len(BAD_IDS)} refused and dead-lettered with the reason, 0 Attach sent, "
          f"reconnects {_session_of(bridge, hw)[1] - reconnects}")


# ------------------------------------------------------------------------------- frames from the PBX
def _sig(call: int, sig: bytes) -> bytes:
    return b'{"api":"EpSignal","mt":"Signaling","src":"%s","call":%d,"sig":%s}' % (FAKE_HW.encode(), call, sig)


async def test_a_binary_frame_from_the_pbx_is_forwarded_as_binary(fake_pbx, bus, settings_for, start_bridge):
    q = await bus.bind("device.*.call.*.signaling")
    bridge = await start_bridge(settings_for(None, pbx_url=fake_pbx.url, pbx_password=FAKE_PASSWORD,
                                             devices=FAKE_HW))
    sess = await fake_pbx.wait_session()
    runner = bridge.pbx.runners[FAKE_HW]
    await eventually(lambda: runner.device.attached, 5, "the device attached")

    binary = _sig(6, b'{"type":"alert","dn":"caf\xe9 \xff"}')  # not UTF-8
    binary_ok = _sig(7, b'{"type":"alert","dn":"caf\xc3\xa9"}')  # UTF-8, but a binary frame
    text = _sig(8, b'{"type":"conn"}')
    await sess.send(binary, text=False)
    await sess.send(binary_ok, text=False)
    await sess.send(text, text=True)
    await sess.until_received(3, timeout=5)

    assert sess.received == [binary, binary_ok, text]  # byte for byte, in order
    assert sess.binary == [True, True, False]  # each as the kind of frame it came as
    assert sess.invalid_text() == []  # no text frame an RFC 6455 PBX would fail
    assert fake_pbx.connections == 1 and not sess.closed.is_set()
    assert runner.reconnects == 0 and runner.session.ws.serving

    evs = [await q.get() for _ in range(3)]  # valid JSON (the fixture's json.loads) for each
    by_call = {e.body["call"]: e.body for e in evs}
    assert by_call[6]["sig"] == {"type": "alert", "dn": "caf\ufffd \ufffd"}  # replaced, readable
    assert by_call[7]["sig"] == {"type": "alert", "dn": "café"}
    assert by_call[8]["sig"] == {"type": "conn"} and all(e.body["origin"] == "pbx" for e in evs)
    # the session still works both ways
    reply = await bus.command(FAKE_HW, "signaling", {"call": -3, "sig": {"type": "setup", "cd": {"num": "1"}}})
    assert reply["ok"] is True
    await sess.until_received(4, timeout=5)
    assert json.loads(sess.received[-1])["call"] == -3 and sess.binary[-1] is False
    print(f"\nFIGURES binary-frame: 3 forwarded (2 binary kept binary, 1 text), 0 invalid text frames, "
          f"connections {fake_pbx.connections}, reconnects {runner.reconnects}, 3 events valid JSON")
