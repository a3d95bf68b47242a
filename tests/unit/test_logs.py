"""Logs: JSON lines off a terminal, secrets masked in messages, arguments and tracebacks."""

from __future__ import annotations

import io
import json
import logging

from bridge.logs import JsonFormatter, RedactSecrets


def _logger(secrets):
    out = io.StringIO()
    h = logging.StreamHandler(out)
    h.setFormatter(JsonFormatter())
    h.addFilter(RedactSecrets(secrets))
    log = logging.getLogger(f"t{id(out)}")
    log.handlers[:] = [h]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log, out


def test_one_json_object_per_line_with_extra_fields():
    log, out = _logger([])
    log.info("session %s attached", "hw1", extra={"hw": "hw1", "n": 3})
    rec = json.loads(out.getvalue())
    assert rec["msg"] == "session hw1 attached" and rec["level"] == "INFO" and rec["hw"] == "hw1"
    assert rec["n"] == 3 and rec["time"].endswith("+00:00")


def test_secrets_are_masked_in_arguments_and_tracebacks():
    log, out = _logger(["s3cr3t-pw", "amqp://u:pw2@h/"])
    log.warning("connect to %s failed", "amqp://u:pw2@h/")
    try:
        raise RuntimeError("login with s3cr3t-pw refused")
    except RuntimeError:
        log.exception("boom")
    text = out.getvalue()
    assert "s3cr3t-pw" not in text and "pw2" not in text and text.count("***") >= 2
    assert "RuntimeError" in text
