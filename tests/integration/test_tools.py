"""The tools for people against a live bridge: send, tail, and the readable event lines."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from bridge import tools
from bridge.tools import ToolError, format_event, send, tail

pytestmark = pytest.mark.broker


async def test_send_and_tail_against_a_live_bridge(sim, bus, settings_for, start_bridge):
    s = settings_for(sim)
    await start_bridge(s)
    hw = sim.hw(2)
    out = io.StringIO()
    ready = asyncio.Event()
    viewer = asyncio.create_task(tail(s, [f"device.{hw}.#"], limit=1, out=out, ready=ready))
    await ready.wait()
    reply = json.loads(await send(s, hw, "attach", ""))
    assert reply["ok"] is True and reply["hw"] == hw
    await asyncio.wait_for(viewer, 10)
    line = out.getvalue().strip()
    assert line.endswith(f"{hw} attached"), line
    bad = json.loads(await send(s, hw, "signaling", '{"call": "x"}'))
    assert bad["ok"] is False and "Expected `int`" in bad["error"]


def test_format_event_lines_are_readable():
    body = json.dumps({"type": "call.state", "hw": "h1", "call": 17, "state": "connected", "in": True,
                       "remote": {"num": "201", "dn": "Bob"}, "held": True, "time": "2026-11-26T10:00:00.123Z"})
    line = format_event("device.h1.call.17.state", body.encode())
    assert line == '10:00:00.123 h1 call    17 connected     in  201 "Bob" [held]'
    coloured = format_event("k", body.encode(), colour=True)
    assert "\x1b[32m" in coloured
    assert "not JSON" in format_event("k", b"\xff")


def test_demo_intercept_needs_the_example_decider(monkeypatch, tmp_path):
    monkeypatch.setattr(tools, "EXAMPLES", tmp_path)
    with pytest.raises(ToolError, match=r"not there .*checkout of the repository"):
        tools._load_decider()
