"""The AsyncAPI document passes the official parser (@asyncapi/parser, run with Node.js)."""

from __future__ import annotations

import json

from .helpers import CONTRACTS, asyncapi, run_node


def test_official_parser_accepts_the_document():
    r = run_node("check-asyncapi.mjs", str(CONTRACTS / "asyncapi.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok: AsyncAPI 3.0.0, 15 channels, 13 operations, 15 messages" in r.stdout
    assert "error" not in r.stdout and "warning" not in r.stdout


def test_official_parser_rejects_a_broken_document(tmp_path):
    # the check bites: a wrong AMQP binding and a dangling reference are errors
    doc = asyncapi()
    doc = json.loads(json.dumps(doc))
    doc["operations"]["publishCallState"]["bindings"]["amqp"]["deliveryMode"] = 3
    doc["channels"]["callState"]["messages"]["callState"]["$ref"] = "#/components/messages/nope"
    bad = tmp_path / "asyncapi.json"
    bad.write_text(json.dumps(doc))
    r = run_node("check-asyncapi.mjs", str(bad))
    assert r.returncode == 1
    assert "deliveryMode" in r.stdout and "nope" in r.stdout, r.stdout
