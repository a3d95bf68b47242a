"""The committed contracts are what the Structs generate, are valid, and their examples hold."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import msgspec
import pytest
from jsonschema import Draft202012Validator

from bridge import commands, contracts, intercept, routing
from bridge import events as E
from bridge.cli import main as cli

from .helpers import (
    CONTRACTS,
    ROOT,
    asyncapi,
    asyncapi_errors,
    body_path,
    channel_regex,
    errors,
    event_channel,
    schema,
)

BODY_PATHS = [b.path for b in contracts.BODIES]


# ------------------------------------------------------------------------------- generation
def test_committed_contracts_are_what_the_structs_generate():
    diff = contracts.check(CONTRACTS)
    assert diff == [], "contracts/ is stale; run `epsignal-bridge contracts`:\n" + "\n".join(diff)
    assert contracts.default_dir() == CONTRACTS
    assert cli(["contracts", "--check"]) == 0


def test_generation_is_byte_identical_across_processes(tmp_path):
    # another process, another hash seed: set or dict ordering must not leak into the files
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run(
        [sys.executable, "-m", "bridge.cli", "contracts", "--dir", str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
        cwd=ROOT,
    )
    made = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert made == sorted(contracts.generate())
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (CONTRACTS / rel).read_bytes(), rel


def test_check_reports_drift_and_regenerating_repairs_it(tmp_path, capsys):
    d = tmp_path / "contracts"
    shutil.copytree(CONTRACTS, d)
    s = json.loads((d / "v1/reply.json").read_text())
    s["description"] = "edited by hand"
    (d / "v1/reply.json").write_text(json.dumps(s, indent=2))
    (d / "v1/events/gap.json").unlink()
    (d / "v1/events/old.json").write_text("{}")
    assert cli(["contracts", "--check", "--dir", str(d)]) == 1
    err = capsys.readouterr().err
    assert "differs: v1/reply.json" in err and '-  "description": "edited by hand"' in err
    assert (
        "missing: v1/events/gap.json" in err and "extra (not generated): v1/events/old.json" in err
    )
    assert (
        "asyncapi.json" not in err and "README.md" not in err
    )  # hand-written files are not judged
    assert cli(["contracts", "--dir", str(d)]) == 0
    assert cli(["contracts", "--check", "--dir", str(d)]) == 0
    assert not (d / "v1/events/old.json").exists() and (d / "README.md").exists()


class DeviceDetached(E.Event, tag="detached", kw_only=True):
    """The real DeviceDetached without the description of its field."""

    reason: str


def test_a_field_without_description_is_refused(monkeypatch):
    bodies = [dataclasses.replace(b, struct=DeviceDetached) if b.struct is E.DeviceDetached else b
              for b in contracts.BODIES]
    monkeypatch.setattr(contracts, "BODIES", bodies)
    monkeypatch.setattr(E.Remote, "__doc__", None)
    with pytest.raises(ValueError, match=r"description.*: DeviceDetached\.reason, Remote$"):
        contracts.generate()


# ------------------------------------------------------------------------------- the schemas
@pytest.mark.parametrize("path", BODY_PATHS)
def test_schema_is_2020_12_and_documented(path):
    s = schema(path)
    Draft202012Validator.check_schema(s)
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s["$id"].startswith("urn:epsignal-bridge:v1:") and s["title"] and s["description"]
    for name, obj in [("", s), *s.get("$defs", {}).items()]:
        assert obj.get("description"), f"{path} {name}: no description"
        for prop, p in obj.get("properties", {}).items():
            assert p.get("description"), f"{path} {name}.{prop}: no description"
    # every message states its schema version, and this schema is for version 1
    assert s["properties"]["v"]["const"] == E.SCHEMA_VERSION == 1
    if not path.startswith(("v1/commands/", "v1/intercept/verdict")):  # what consumers send
        assert "v" in s["required"]  # published: always there


def test_ids_are_unique():
    ids = [schema(p)["$id"] for p in BODY_PATHS]
    assert len(set(ids)) == len(ids)


def test_sig_is_an_object_passed_through_with_unknown_fields():
    ev = schema("v1/events/call.signaling.json")["properties"]["sig"]
    assert (
        ev["type"] == "object"
        and "losslessly" in ev["description"]
        and "unknown" in ev["description"]
    )
    base = schema("v1/events/call.signaling.json")["examples"][0]
    for sig, ok in [
        ({"type": "setup", "x-vendor": {"a": [1]}}, True),
        ({}, True),
        ([], False),
        ("setup", False),
    ]:
        assert (errors(body_path("events", "call.signaling"), {**base, "sig": sig}) == []) is ok, (
            sig
        )
    # the command's sig: what the bridge reads must be typed right, anything else passes
    cmd = body_path("commands", "signaling")
    assert errors(cmd, {"call": -1, "sig": {"type": "setup", "unknown": {"deep": True}}}) == []
    assert errors(cmd, {"call": -1, "sig": {}}) != []  # the bridge refuses a sig without type
    assert errors(cmd, {"call": -1, "sig": {"type": "setup", "cg": "201"}}) != []
    # the signaling command is strict: a misspelt field (`To` for `to`) would send the message
    # the wrong way, so the schema refuses unknown fields as the bridge does
    assert errors(cmd, {"call": -1, "sig": {"type": "setup"}, "To": True}) != []
    # attach and detach ignore unknown fields, so adding an optional one stays compatible
    assert errors(body_path("commands", "attach"), {"extra": 1}) == []


def test_time_is_an_rfc3339_date_time():
    path = body_path("events", "detached")
    ex = schema(path)["examples"][0]
    assert schema(path)["properties"]["time"]["format"] == "date-time"
    assert errors(path, {**ex, "time": "2026-11-26T10:00:00.5+01:00"}) == []
    assert errors(path, {**ex, "time": "26.11.2026 10:00"}) != []
    assert errors(path, {**ex, "time": 1795687200}) != []


# ------------------------------------------------------------------------------- examples
@pytest.mark.parametrize("path", BODY_PATHS)
def test_examples_validate_and_mutations_do_not(path):
    s = schema(path)
    assert s["examples"], path
    for ex in s["examples"]:
        assert errors(path, ex) == [], ex
        for field in s.get("required", []):
            broken = {k: v for k, v in ex.items() if k != field}
            assert errors(path, broken), f"{path}: valid without {field}"
        assert errors(path, {**ex, "v": 2}), f"{path}: v 2 accepted by the v1 schema"


@pytest.mark.parametrize("body", contracts.BODIES, ids=lambda b: b.path)
def test_examples_are_what_the_bridge_reads_and_writes(body):
    for _, _, ex in body.examples:
        raw = json.dumps(ex).encode()
        if body.kind == "commands":
            hw, verb, cmd = commands.parse(f"device.{contracts.HW}.{body.name}", raw)
            assert (hw, verb) == (contracts.HW, body.name) and isinstance(cmd, body.struct)
        elif body.kind == "verdict":  # a valid answer to the example request
            example = next(b for b in contracts.BODIES if b.kind == "request").examples[0][2]
            req = msgspec.json.decode(json.dumps(example).encode(), type=intercept.InterceptRequest)
            rule = intercept.Rules(intercept.parse_config("*=setup:device")).match(req.hw, "setup", True)
            hold = intercept.Hold(req.id, req.hw, req.call, req.to, "setup", req.sig, None, rule, 0.0, 0.25)
            assert intercept.validate_verdict(raw, hold).error is None, ex
        else:  # an event or reply decodes into its Struct and encodes back to the same JSON
            obj = msgspec.json.decode(raw, type=body.struct)
            assert json.loads(msgspec.json.encode(obj)) == ex


def test_every_struct_built_by_the_factory_matches_its_schema():
    from bridge.protocol.callstate import CallStatus
    from bridge.protocol.messages import AttachResult

    f = E.EventFactory("bridge-x")
    hw = "00:90:33.40@01"  # a valid hw id (bridge.ids) that needs percent-encoding in keys
    outs = [
        f.attached(hw, AttachResult(stun="a;b", turn="t", turnPwd="secret", country="49")),
        f.attached(hw, AttachResult()),
        f.detached(hw, "shutdown"),
        f.attach_failed(hw, {"code": 3}),
        f.call_state(hw, CallStatus(call=4, state="null")),
        f.call_state(
            hw,
            CallStatus(
                call=-1,
                state="released",
                in_=False,
                app=True,
                cause=msgspec.convert({"num": 16, "loc": "user"}, E.Cause),
            ),
            sync=True,
        ),
        f.signaling(hw, 4, True, msgspec.Raw(b'{"type":"conn","unknown":[1,{"x":null}]}'), "pbx"),
        f.gap("buffer-full+too-old", {hw: [(1, 5), (9, 9)]}),
        f.intercepted(hw, 4, True, "i/h/i1", "setup", "reject", "rejected", 1.25, cause=21),
        f.intercepted(hw, 4, False, "i/h/i2", "conn", "bad-verdict", "forwarded", 3.0, error="x"),
    ]
    for o in outs:
        body = json.loads(o.body)
        assert errors(body_path("events", o.type), body) == [], (o.type, body)
        assert channel_regex(event_channel(o.type)["address"]).fullmatch(o.key), (o.type, o.key)
    assert routing.word(hw) in outs[0].key


def test_replies_built_by_the_bridge_match_the_schema():
    path = body_path("reply", "reply")
    for r in [
        commands.error_reply("bad"),
        commands.error_reply("x", command="attach", hw="h"),
        commands.Reply(ok=True, command="attach", hw="h", attach=E.AttachInfo(), attached=False),
        commands.Reply(ok=True, command="intercept", hw="h",
                       rules=intercept.Rules(intercept.parse_config("*=setup:device")).effective("h")),
    ]:
        assert errors(path, json.loads(commands.encode_reply(r))) == []


# ------------------------------------------------------------------------------- AsyncAPI
def test_asyncapi_components_are_the_json_schemas():
    comps = asyncapi()["components"]["schemas"]
    for b in contracts.BODIES:
        s = copy.deepcopy(schema(b.path))
        defs = s.pop("$defs", {})
        for k in ("$schema", "$id", "examples"):
            del s[k]
        text = json.dumps(s).replace("#/$defs/", "#/components/schemas/")
        assert json.loads(text) == comps[b.title], b.path
        for name, d in defs.items():
            assert (
                json.loads(json.dumps(d).replace("#/$defs/", "#/components/schemas/"))
                == comps[name]
            )


def test_asyncapi_describes_every_key_exchange_and_parameter():
    doc = asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    addresses = {ch["address"]: ch for ch in doc["channels"].values()}
    assert set(addresses) == {
        "device.{hw}.attached",
        "device.{hw}.detached",
        "device.{hw}.attach.failed",
        "device.{hw}.call.{call}.state",
        "device.{hw}.call.{call}.signaling",
        "bridge.{instance}.gap",
        "device.{hw}.attach",
        "device.{hw}.detach",
        "device.{hw}.signaling",
        "device.{hw}.call.{call}.intercepted",
        "device.{hw}.call.{call}.intercept",
        "device.{hw}.intercept",
        None,
        "{key}",
    }
    exchanges = {
        ch["bindings"]["amqp"]["exchange"]["name"]
        for ch in doc["channels"].values()
        if "bindings" in ch
    }
    assert exchanges == {"epsignal.events", "epsignal.commands", "epsignal.dead"}
    for ch in doc["channels"].values():
        if ch.get("bindings"):
            ex = ch["bindings"]["amqp"]["exchange"]
            assert ex["type"] == "topic" and ex["durable"] is True
        for p in ("hw", "call", "instance"):
            if ch["address"] and "{" + p + "}" in ch["address"]:
                assert ch["parameters"][p]["$ref"] == f"#/components/parameters/{p}"
    assert "percent-encoded" in doc["components"]["parameters"]["hw"]["description"]
    ops = doc["operations"]
    for name, op in ops.items():
        if name.startswith("publish"):
            assert op["action"] == "send" and op["bindings"]["amqp"]["deliveryMode"] == 2
        elif name == "requestVerdict":  # intercept mode: a request, not persistent, mandatory
            assert op["action"] == "send" and op["bindings"]["amqp"]["deliveryMode"] == 1
            assert op["bindings"]["amqp"]["mandatory"] and op["reply"]["channel"]["$ref"] == "#/channels/verdict"
        else:
            assert (
                op["action"] == "receive" and op["reply"]["channel"]["$ref"] == "#/channels/reply"
            )
    assert len([o for o in ops.values() if o["action"] == "receive"]) == 4
    queue = doc["channels"]["signalingCommand"]["x-epsignal-queue"]
    assert queue["arguments"] == {"x-queue-type": "quorum", "x-dead-letter-exchange": "epsignal.dead"}
    headers = doc["components"]["schemas"]
    for h in ("traceparent", "tracestate"):
        assert (
            h in headers["EventHeaders"]["properties"]
            and h in headers["CommandHeaders"]["properties"]
        )
    assert {"reply_to", "correlation_id"} <= set(headers["CommandHeaders"]["properties"])
    assert "x-epsignal-error" in headers["DeadLetterHeaders"]["properties"]
    assert {"type", "message_id", "content_type", "timestamp"} <= set(
        headers["EventHeaders"]["required"]
    )


def test_every_asyncapi_example_validates_against_payload_and_headers():
    doc = asyncapi()
    n = 0
    for mid, msg in doc["components"]["messages"].items():
        payload = msg["payload"]["$ref"].rsplit("/", 1)[1]
        headers = msg["headers"]["$ref"].rsplit("/", 1)[1]
        assert msg["examples"], mid
        for ex in msg["examples"]:
            assert asyncapi_errors(payload, ex["payload"]) == [], (mid, ex["name"])
            assert asyncapi_errors(headers, ex["headers"]) == [], (mid, ex["name"])
            n += 1
    assert n >= 20
    # and the validation bites
    assert asyncapi_errors("CallStateChanged", {"type": "call.state"})
    assert asyncapi_errors("EventHeaders", {"type": "call.state", "content_type": "text/plain"})


def test_asyncapi_event_examples_use_keys_and_ids_the_bridge_would():
    doc = asyncapi()
    for msg in doc["components"]["messages"].values():
        if msg["headers"]["$ref"].endswith("EventHeaders"):
            for ex in msg["examples"]:
                p, h = ex["payload"], ex["headers"]
                assert h["type"] == p["type"] == msg["name"]
                if p["type"] != "gap":
                    assert h["message_id"] == f"{p['instance']}/{routing.word(p['hw'])}/{p['seq']}"
