"""The command line as a user meets it, as processes, without a broker: --version, `config
--check` / `--effective`, a closed pipe, a port in use, a broker that is not there, and what
scripts/bootstrap installs for the demo and for the tests (issue 16, items 1, 3, 4, 6, 9)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: a port nothing listens on (bound, never listened: connections are refused)
_HOLD = socket.socket()
_HOLD.bind(("127.0.0.1", 0))
DEAD_PORT = _HOLD.getsockname()[1]
DEAD_URL = f"amqp://guest:dead-secret-pw@127.0.0.1:{DEAD_PORT}/"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPSIGNAL_")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def cli(*args: str, timeout: float = 20, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], env=_env(**env), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_sentence(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


def test_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip().startswith("epsignal-bridge 0."), r


def test_config_check_ok_names_broker_and_pbx_masked():
    r = cli("config", "--check", EPSIGNAL_AMQP_URL="amqp://bob:hunter2-pw@rabbit.example:5673/prod",
            EPSIGNAL_PBX_URL="wss://pbx.example/PBX0/APPS/websocket?token=tok-secret",
            EPSIGNAL_DEVICES="009033400001,009033400002")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("configuration OK:") and "\n" not in line
    assert "amqp://bob:***@rabbit.example:5673/prod" in line and "(vhost prod)" in line
    assert "wss://pbx.example/PBX0/APPS/websocket" in line and "2 devices" in line
    assert "hunter2-pw" not in line and "tok-secret" not in line


def test_config_check_refuses_a_bad_setting_with_exit_2():
    r = cli("config", "--check", EPSIGNAL_HTTP_PORT="eighty")
    assert r.returncode == 2 and r.stdout == ""
    assert "EPSIGNAL_HTTP_PORT" in one_sentence(r.stderr)


def test_config_effective_shows_values_with_secrets_masked():
    r = cli("config", "--effective", EPSIGNAL_AMQP_URL="amqp://bob:hunter2-pw@rabbit.example/",
            EPSIGNAL_PBX_PASSWORD="pbx-secret-pw", EPSIGNAL_HTTP_PORT="9090")
    assert r.returncode == 0, r.stderr
    assert "EPSIGNAL_AMQP_URL=amqp://bob:***@rabbit.example/    # environment" in r.stdout
    assert "EPSIGNAL_PBX_PASSWORD=***    # environment" in r.stdout
    assert "EPSIGNAL_HTTP_PORT=9090    # environment" in r.stdout
    assert "EPSIGNAL_EVENTS_EXCHANGE=epsignal.events    # default" in r.stdout
    assert "hunter2-pw" not in r.stdout and "pbx-secret-pw" not in r.stdout


def test_config_into_a_closed_pipe_ends_quietly():
    """`epsignal-bridge config | head`: the reader is gone before the output is written."""
    rd, wr = os.pipe()
    os.close(rd)
    try:
        p = subprocess.run([sys.executable, "-m", "bridge.cli", "config"], env=_env(), cwd=ROOT,
                           stdout=wr, stderr=subprocess.PIPE, text=True, timeout=20, check=False)
    finally:
        os.close(wr)
    assert p.returncode == 141 and p.stderr == "", p.stderr


def test_run_with_the_http_port_in_use_says_so():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("run", EPSIGNAL_HTTP_HOST="127.0.0.1", EPSIGNAL_HTTP_PORT=str(port),
                EPSIGNAL_AMQP_URL=DEAD_URL)
    assert r.returncode == 1
    assert one_sentence(r.stderr).startswith(f"epsignal-bridge: EPSIGNAL_HTTP_PORT {port} is in use: ")


def _fast_failure(*args: str, **env: str) -> str:
    t0 = time.monotonic()
    r = cli(*args, **env)
    assert time.monotonic() - t0 < 8
    assert r.returncode == 1, (r.stdout, r.stderr)
    return one_sentence(r.stderr)


def test_send_and_tail_with_the_broker_down_say_which_broker():
    masked = f"amqp://guest:***@127.0.0.1:{DEAD_PORT}/"
    for args, env in ((("send", "attach", "009033400001", "--amqp-url", DEAD_URL), {}),
                      (("tail",), {"EPSIGNAL_AMQP_URL": DEAD_URL})):
        r = cli(*args, **env)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"broker {masked} (vhost /)" in r.stderr  # which broker, before anything else
        assert one_sentence(r.stderr) == f"epsignal-bridge: cannot reach the broker {masked}: connection refused"
        assert "dead-secret-pw" not in r.stderr


def test_demo_with_the_broker_down_fails_fast_naming_it():
    masked = f"amqp://guest:***@127.0.0.1:{DEAD_PORT}/"
    line = _fast_failure("demo", "--duration", "30", EPSIGNAL_AMQP_URL=DEAD_URL)
    assert line == f"epsignal-bridge: cannot reach the broker {masked}: connection refused"
    line = _fast_failure("demo", "--amqp-url", DEAD_URL.replace("127.0.0.1", "no-such-host.invalid"))
    assert "no-such-host.invalid" in line and "dead-secret-pw" not in line


# --------------------------------------------------------------------------- scripts/bootstrap
FAKE_PYTHON = """#!/usr/bin/env bash
# python3 for -c; `-m venv DIR` makes a venv whose python and epsignal-bridge only log their arguments
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"
  printf '#!/usr/bin/env bash\\necho "python $*" >> %s/calls.log\\n' "$LOGDIR" > "$3/bin/python"
  printf '#!/usr/bin/env bash\\necho "epsignal-bridge $*" >> %s/calls.log\\n' "$LOGDIR" > "$3/bin/epsignal-bridge"
  chmod +x "$3/bin/python" "$3/bin/epsignal-bridge"
  exit 0
fi
exec python3 "$@"
"""


def test_demo_installs_the_runtime_lock_and_tests_the_dev_lock(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for f in ("scripts/bootstrap", "scripts/demo", "scripts/ensure-rabbitmq", "requirements.lock",
              "requirements-dev.lock", "pyproject.toml"):
        shutil.copy2(ROOT / f, repo / f)
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PYTHON=str(fake), LOGDIR=str(tmp_path),
               EPSIGNAL_AMQP_URL="amqp://guest:guest@broker.example/")  # no local broker needed

    def run(*cmd: str) -> list[str]:
        before = log.read_text().splitlines() if log.exists() else []
        subprocess.run(cmd, cwd=repo, env=env, check=True, timeout=30, capture_output=True)
        return log.read_text().splitlines()[len(before):]

    calls = run("scripts/demo", "--duration", "1")
    installs = [c for c in calls if "pip install" in c and " -r " in c]
    assert installs == ["python -m pip install --quiet --require-hashes -r requirements.lock"], calls
    assert calls[-1] == "epsignal-bridge demo --duration 1"
    assert [c for c in run("scripts/demo") if "pip" in c] == []  # stamped: nothing again
    installs = [c for c in run("scripts/bootstrap", "dev") if " -r " in c]
    assert installs == ["python -m pip install --quiet --require-hashes -r requirements-dev.lock"]
    assert run("scripts/bootstrap", "dev") == [] and run("scripts/bootstrap", "runtime") == []
    with open(repo / "requirements.lock", "a") as f:
        f.write("# changed\n")
    assert [c for c in run("scripts/bootstrap", "runtime") if " -r " in c] == [
        "python -m pip install --quiet --require-hashes -r requirements.lock"]
    r = subprocess.run(["scripts/bootstrap", "everything"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.returncode == 2 and "unknown mode" in r.stderr
    assert "scripts/bootstrap dev" in (ROOT / "scripts/test").read_text()
