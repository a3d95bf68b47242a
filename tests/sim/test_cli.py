"""The pbx-sim command as a process."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys

import aiohttp

from bridge.sim import cli
from tests.sim.helpers import App

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_arguments_and_help():
    p = argparse.ArgumentParser(prog="pbx-sim")
    cli.add_arguments(p)
    a = p.parse_args([])
    assert a.listen == ("127.0.0.1", 8765) and a.control is None and a.connect is None
    a = p.parse_args(["--listen", "0.0.0.0:9000", "--control", ":8766", "--devices", "7",
                      "--call-rate", "2.5", "--seed", "3"])
    assert a.listen == ("0.0.0.0", 9000) and a.control == ("127.0.0.1", 8766)
    assert (a.devices, a.call_rate, a.seed) == (7, 2.5, 3)
    text = p.format_help()
    for needle in ("009033400001", "/devices/<hw>/calls", "/sessions/drop", "/sessions/garbage",
                   "/faults", "/stats", '"refuse_logins"', "EPSIGNAL_SIM_PASSWORD", "--connect"):
        assert needle in text


async def test_process_runs_and_stops_on_sigterm():
    env = dict(os.environ, EPSIGNAL_SIM_PASSWORD="very-secret-pw", PYTHONPATH=ROOT)
    code = ("import argparse, asyncio, sys; from bridge.sim import cli; "
            "p = argparse.ArgumentParser(); cli.add_arguments(p); "
            "sys.exit(asyncio.run(cli.main(p.parse_args(sys.argv[1:]))))")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0",
        "--devices", "3", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(10):
            line = (await proc.stdout.readline()).decode()
        m = re.search(r"(ws://\S+) control at (http://\S+)", line)
        assert m, line
        app = await App.logged_in(m.group(1), password="very-secret-pw")
        async with aiohttp.ClientSession() as http, http.get(m.group(2) + "/stats") as r:
            st = await r.json()
        assert st["logins_ok"] == 1 and st["registered_devices"] == 3
        await app.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert b"very-secret-pw" not in line.encode() + out + err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_bad_options_exit_2(capsys):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    assert await cli.main(p.parse_args(["--devices", "10000"])) == 2
    assert "at most 9999" in capsys.readouterr().err


async def test_in_process_start_line_stats_line_and_sigint(monkeypatch, capsys):
    monkeypatch.setattr(cli, "STATS_EVERY_S", 0.05)
    monkeypatch.setenv("EPSIGNAL_SIM_PASSWORD", "from-env-pw")
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--listen", "127.0.0.1:0", "--devices", "2"])
    task = asyncio.create_task(cli.main(args))
    out = ""
    async with asyncio.timeout(5):
        while "pbx-sim: sessions=" not in out:  # the start line, then a stats line
            await asyncio.sleep(0.02)
            out += capsys.readouterr().out
    url = re.search(r"(ws://\S+)", out).group(1)
    await (await App.logged_in(url, password="from-env-pw")).close()
    os.kill(os.getpid(), signal.SIGINT)  # handled by main's signal handler: a clean stop
    async with asyncio.timeout(5):
        assert await task == 0
    assert "from-env-pw" not in out + capsys.readouterr().out
    assert "control at off" in out
