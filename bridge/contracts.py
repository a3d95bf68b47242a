"""The contracts of the bus, generated from the msgspec Structs: one JSON Schema (2020-12) per
event, command and reply body, and one AsyncAPI 3.0 document for the whole bus.

``epsignal-bridge contracts`` writes them into ``contracts/``; ``--check`` compares instead. The
output is deterministic (fixed key order, sorted components, compact examples produced by the
bridge's own encoder), so regenerating gives byte-identical files. Pure: no I/O but
:func:`write` and :func:`check`.

The descriptions are the Structs' own: a field's ``Meta(description=...)`` (the envelope
fields' are :data:`COMMON`), a Struct's or enum's docstring. What the Structs cannot say (AMQP
properties and headers, routing keys, examples) is in the tables below; :func:`generate` refuses
to run when a field or Struct has no description, so a new field cannot be published
undocumented.
"""

from __future__ import annotations

import difflib
import inspect
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
from msgspec import Raw

from bridge import commands as C
from bridge import ids, routing
from bridge import events as E
from bridge import intercept as I
from bridge.config import Settings
from bridge.events import SCHEMA_VERSION as V
from bridge.protocol.signal import Sig

DIALECT = "https://json-schema.org/draft/2020-12/schema"
VDIR = f"v{V}"
DEFAULTS = Settings.from_env({})  # the names the contracts show are the settings' defaults
EVENTS_EXCHANGE, COMMANDS_EXCHANGE, DEAD_EXCHANGE = (DEFAULTS.events_exchange, DEFAULTS.commands_exchange,
                                                    DEFAULTS.dead_exchange)
COMMANDS_QUEUE, DEAD_QUEUE = DEFAULTS.commands_queue, DEFAULTS.dead_queue
AMQP_BINDING = "0.3.0"

# ------------------------------------------------------------------------------------ words
COMMON = {
    "type": "The event name; the same as the AMQP `type` property.",
    "v": f"Schema version (major), {V} for this schema. Compatible changes (new optional fields) "
         "keep it; see contracts/README.md.",
    "hw": f"Hardware id of the device, as the PBX knows it (not percent-encoded): {ids.HW_RULE}.",
    "seq": "Number of the event per device and bridge instance: 1, 2, 3, ... without gaps. "
           "(`instance`, `hw`, `seq`) identifies the event; a duplicate has the same.",
    "instance": "Id of the bridge instance that published the event. A restarted bridge has a new "
                "id and counts `seq` from 1 again.",
    "time": "When the bridge saw it: UTC, an RFC 3339 date-time.",
}
def type_description(cls: type) -> str:
    """A Struct's or enum's docstring as one line (the schemas' ``description``)."""
    return " ".join(inspect.cleandoc(cls.__doc__ or "").split())


@dataclass
class Body:
    """One message body: its Struct, where its schema goes, and what a consumer needs to know."""

    kind: str  # "events", "commands", "reply", "request" and "verdict" (intercept mode)
    name: str  # event type / command verb / "reply"
    struct: type
    title: str
    description: str
    address: str | None = None  # routing-key pattern
    examples: list[tuple[str, str, Any]] = field(default_factory=list)  # (name, summary, body)

    @property
    def path(self) -> str:
        if self.kind == "reply":
            return f"{VDIR}/reply.json"
        if self.kind in ("request", "verdict"):
            return f"{VDIR}/intercept/{self.kind}.json"
        return f"{VDIR}/{self.kind}/{self.name}.json"

    @property
    def id(self) -> str:
        if self.kind in ("request", "verdict"):
            return f"urn:epsignal-bridge:{VDIR}:intercept:{self.kind}"
        return f"urn:epsignal-bridge:{VDIR}:{self.kind}:{self.name}"

    @property
    def output(self) -> bool:
        """Published by the bridge: every field it always encodes is required."""
        return self.kind not in ("commands", "verdict")


# ------------------------------------------------------------------------------------ examples
HW, HW2, INSTANCE = "009033400001", "009033400002", "bridge-a1"
T0 = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)
ATTACH = E.AttachInfo(
    stun=["stun1.example.net", "stun2.example.net"], turn=["turn.example.net:3478"],
    turnUsr="epsignal", prefixIntl="000", prefixNtl="00", prefixSubs="0", area="7031", country="49",
    maxIntern=4, tones=1)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _enc(obj: Any) -> Any:
    """A body as the bridge encodes it, as plain JSON values."""
    return json.loads(msgspec.json.encode(obj))


def _ev(cls: type, seq: int, hw: str = HW, **kw: Any) -> Any:
    return _enc(cls(hw=hw, seq=seq, instance=INSTANCE, time=T0, **kw))


def _sig(obj: dict) -> Raw:
    return Raw(json.dumps(obj, separators=(",", ":")).encode())


REQ_ID = f"{INSTANCE}/{HW}/i7"
SETUP_201 = _sig({"type": "setup", "cg": {"num": "201", "sip": "r201"}, "cd": {"num": "101"},
                  "fty": [{"type": "name_identification", "name": "Remote 201"}], "channel": 1})
SETUP_CRM = _sig({"type": "setup", "cg": {"num": "201", "sip": "r201"}, "cd": {"num": "101"},
                  "fty": [{"type": "name_identification", "name": "Ada Lovelace (ACME)"}], "channel": 1})
R201 = msgspec.convert({"num": "201", "sip": "r201", "dn": "Remote 201"}, E.Remote)
BODIES = [
    Body("events", "attached", E.DeviceAttached, "DeviceAttached",
         type_description(E.DeviceAttached),
         routing.EVENT_KEYS["attached"],
         [("attached", "Attached at start", _ev(E.DeviceAttached, 1, attach=ATTACH))]),
    Body("events", "detached", E.DeviceDetached, "DeviceDetached",
         type_description(E.DeviceDetached), routing.EVENT_KEYS["detached"],
         [("by-command", "Detached by a detach command",
           _ev(E.DeviceDetached, 42, reason="command")),
          ("session-lost", "The PBX session broke; the bridge reconnects",
           _ev(E.DeviceDetached, 43, reason="session-lost"))]),
    Body("events", "attach.failed", E.AttachFailed, "AttachFailed",
         type_description(E.AttachFailed), routing.EVENT_KEYS["attach.failed"],
         [("unknown-device", "The PBX does not know the device",
           _ev(E.AttachFailed, 1, hw="009033400099", error="unknown device"))]),
    Body("events", "call.state", E.CallStateChanged, "CallStateChanged",
         type_description(E.CallStateChanged),
         routing.EVENT_KEYS["call.state"],
         [("incoming-alert", "An incoming call rings",
           _ev(E.CallStateChanged, 7, call=17, state="alert", in_=True, remote=R201)),
          ("click-to-dial-connected", "A call placed by a signaling command is answered",
           _ev(E.CallStateChanged, 12, call=-1, state="connected", in_=False, app=True,
               remote=E.Remote(num="201"), channel=0)),
          ("released", "The call is gone, with its cause",
           _ev(E.CallStateChanged, 9, call=17, state="released", in_=True, remote=R201,
               cause=msgspec.convert({"num": 16}, E.Cause))),
          ("evicted", "The bridge stopped tracking a call that had no signaling for too long",
           _ev(E.CallStateChanged, 30, call=21, state="released", in_=True, remote=R201,
               evicted="idle")),
          ("sync", "A call that existed at attach",
           _ev(E.CallStateChanged, 2, hw=HW2, call=3, state="connected", in_=False,
               remote=E.Remote(num="0703173000"), held=True, sync=True))]),
    Body("events", "call.signaling", E.CallSignaling, "CallSignaling",
         type_description(E.CallSignaling),
         routing.EVENT_KEYS["call.signaling"],
         [("setup-to-device", "An incoming call's setup, forwarded to the device",
           _ev(E.CallSignaling, 6, call=17, to=True, origin="pbx", sig=_sig(
               {"type": "setup", "cg": {"num": "201", "sip": "r201"}, "cd": {"num": "101"},
                "fty": [{"type": "name_identification", "name": "Remote 201"}], "channel": 1}))),
          ("setup-by-command", "Click to dial: the setup sent for a signaling command",
           _ev(E.CallSignaling, 10, call=-1, to=False, origin="command",
               sig=_sig({"type": "setup", "cd": {"num": "201"}})))]),
    Body("events", "gap", E.Gap, "Gap",
         type_description(E.Gap),
         routing.EVENT_KEYS["gap"],
         [("buffer-full", "The buffer overflowed during a broker outage", _enc(E.Gap(
             instance=INSTANCE, time=T0, reason="buffer-full",
             dropped={HW: [E.SeqRange(120, 185)],
                      HW2: [E.SeqRange(88, 90), E.SeqRange(95, 95)]})))]),
    Body("events", "call.intercepted", E.CallIntercepted, "CallIntercepted",
         type_description(E.CallIntercepted),
         routing.EVENT_KEYS["call.intercepted"],
         [("renamed", "A decider replaced the setup's caller name",
           _ev(E.CallIntercepted, 5, call=17, to=True, id=REQ_ID, sig_type="setup", outcome="replace",
               action="replaced", waited_ms=3.2)),
          ("screened", "A decider rejected the call: the phone never rang",
           _ev(E.CallIntercepted, 5, call=18, to=True, id=f"{INSTANCE}/{HW}/i8", sig_type="setup",
               outcome="reject", action="rejected", waited_ms=2.9, cause=21)),
          ("timeout", "No verdict in time: forwarded unchanged (fail open)",
           _ev(E.CallIntercepted, 5, call=19, to=True, id=f"{INSTANCE}/{HW}/i9", sig_type="setup",
               outcome="timeout", action="forwarded", waited_ms=250.4)),
          ("bad-verdict", "A verdict with a replacement of another type: refused, forwarded",
           _ev(E.CallIntercepted, 5, call=20, to=True, id=f"{INSTANCE}/{HW}/i10", sig_type="setup",
               outcome="bad-verdict", action="forwarded", waited_ms=4.1,
               error="the replacement sig's type 'alert' is not the held message's 'setup' - at "
                     "`$.sig.type`"))]),
    Body("request", "call.intercept", I.InterceptRequest, "InterceptRequest",
         "A message held for a verdict (intercept mode, docs/INTERCEPT.md). Not an event: not "
         "numbered, not persistent, published with `mandatory` (nobody bound: the fail policy "
         "applies at once) and `expiration` = the deadline. Answer with a Verdict to `reply_to`.",
         routing.EVENT_KEYS["call.intercept"],
         [("setup", "An incoming call's setup waits for a verdict", _enc(I.InterceptRequest(
             id=REQ_ID, hw=HW, instance=INSTANCE, time=T0, call=17, to=True, sig=SETUP_201,
             deadline=T0 + timedelta(milliseconds=250), deadline_ms=250, fail="open")))]),
    Body("verdict", "verdict", I.Verdict, "Verdict",
         "The answer to an InterceptRequest: to its `reply_to` through the default exchange, with "
         "`correlation_id` = the request's `id`, before its `deadline`. Strict: an unknown field "
         "makes it a bad verdict (the message is forwarded unchanged).", None,
         [("rename", "Forward the setup with the CRM's name for the caller",
           {"id": REQ_ID, "verdict": "forward", "sig": json.loads(bytes(SETUP_CRM))}),
          ("forward", "Forward unchanged", {"id": REQ_ID, "verdict": "forward"}),
          ("screen", "Reject: the caller gets cause 21, the phone never rings",
           {"v": V, "id": REQ_ID, "verdict": "reject", "cause": 21})]),
    Body("commands", "attach", C.AttachCommand, "AttachCommand",
         "Attach the device: the bridge gets into its signaling path. Idempotent. The body may "
         "also be empty.", routing.COMMAND_KEYS["attach"],
         [("empty", "Attach (an empty object; an empty body works too)", {}),
          ("versioned", "Attach, stating the schema version", {"v": V})]),
    Body("commands", "detach", C.DetachCommand, "DetachCommand",
         "Detach the device (client mode only). Idempotent. The body may also be empty.",
         routing.COMMAND_KEYS["detach"], [("empty", "Detach", {})]),
    Body("commands", "signaling", C.SignalingCommand, "SignalingCommand",
         "Send a Signaling message on the device's behalf, toward the PBX (`to` false) or the "
         "device.", routing.COMMAND_KEYS["signaling"],
         [("click-to-dial",
           "Place a call to 201 from the device (answers come as call.state of call -1)",
           {"v": V, "call": -1, "sig": {"type": "setup", "cd": {"num": "201"}}}),
          ("hang-up", "Release the call placed before",
           {"call": -1, "sig": {"type": "rel", "cau": {"num": 16}}})]),
    Body("commands", "intercept", I.InterceptCommand, "InterceptCommand",
         "Set the device's intercept rules (docs/INTERCEPT.md): which messages wait for a verdict "
         "from the bus. Replaces the rules set by command before; with leases they follow the "
         "device to another replica.", routing.COMMAND_KEYS["intercept"],
         [("screen-incoming", "Hold every setup toward the device for a verdict",
           {"rules": [{"type": "setup", "to": True}]}),
          ("fail-closed", "Hold setups for 500 ms; without a verdict reject them with cause 21",
           {"v": V, "rules": [{"type": "setup", "to": True, "deadline_ms": 500, "fail": "closed",
                               "cause": 21}]}),
          ("off", "Clear the rules set by command", {"rules": []})]),
    Body("reply", "reply", C.Reply, "Reply",
         "The answer to a command that had `reply_to`, sent to that queue with the command's "
         "`correlation_id`. Optional fields are left out, never null.", None,
         [("attach-ok", "Attached",
           _enc(C.Reply(ok=True, command="attach", hw=HW, attach=ATTACH, attached=True))),
          ("detach-ok", "Detached",
           _enc(C.Reply(ok=True, command="detach", hw=HW, was_attached=True))),
          ("signaling-ok", "Signaling sent", _enc(C.Reply(ok=True, command="signaling", hw=HW))),
          ("intercept-ok", "Intercept rules set", _enc(C.Reply(ok=True, command="intercept", hw=HW, rules=[
              I.Effective(type="setup", to=True, deadline_ms=250, fail="open", cause=21, source="command")]))),
          ("not-attached", "Refused: the device is not attached",
           _enc(C.error_reply(f"device {HW} is not attached", command="signaling", hw=HW))),
          ("bad-key", "Refused: the routing key is not device.<hw>.<verb>",
           _enc(C.error_reply("routing key 'totally.wrong' is not device.<hw>.<verb> with verb "
                              "one of attach, detach, signaling")))]),
]
BY_TYPE = {b.name: b for b in BODIES if b.kind == "events"}
#: Raw fields that stand for a typed view: (Struct, field) -> the view's Struct
RAW_VIEWS = {("SignalingCommand", "sig"): Sig, ("InterceptRequest", "sig"): Sig, ("Verdict", "sig"): Sig}


# ------------------------------------------------------------------------------------ schemas
def _bare(t: mi.Type) -> mi.Type:
    """An inspected type without its ``Annotated`` metadata."""
    while isinstance(t, mi.Metadata):
        t = t.type
    return t


def field_description(f: mi.Field) -> str | None:
    """A field's ``Meta(description=...)`` (the outermost, where aliases nest)."""
    t = f.type
    while isinstance(t, mi.Metadata):
        text = (t.extra_json_schema or {}).get("description")
        if text:
            return text
        t = t.type
    return None


def _structs(t: mi.Type, out: dict[str, mi.StructType], kinds: dict[str, type]) -> None:
    """Every Struct reachable from an inspected type, by name (``out``), and the class of every
    Struct and enum (``kinds``)."""
    t = _bare(t)
    if isinstance(t, mi.StructType):
        if t.cls.__name__ not in out:
            out[t.cls.__name__] = t
            kinds[t.cls.__name__] = t.cls
            for f in t.fields:
                _structs(f.type, out, kinds)
    elif isinstance(t, mi.EnumType):
        kinds[t.cls.__name__] = t.cls
    elif isinstance(t, mi.UnionType):
        for u in t.types:
            _structs(u, out, kinds)
    elif isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        _structs(t.item_type, out, kinds)
    elif isinstance(t, mi.DictType):
        _structs(t.value_type, out, kinds)


def _always_encoded(st: mi.StructType) -> list[str]:
    """Fields the encoder always writes: required ones, and with defaults unless omit_defaults."""
    omit = st.cls.__struct_config__.omit_defaults
    def has_default(f: mi.Field) -> bool:  # an UNSET default shows as no default at all
        return f.default is not msgspec.NODEFAULT or f.default_factory is not msgspec.NODEFAULT

    return [f.encode_name for f in st.fields if f.required or (not omit and has_default(f))]


KEY_ORDER = ["$schema", "$id", "title", "description", "$ref", "const", "enum", "type", "format",
             "minimum", "default", "properties", "additionalProperties", "required", "items",
             "anyOf", "examples", "$defs"]


def _ordered(schema: dict) -> dict:
    """Keys in a fixed order (unknown keys last, sorted), recursively."""
    def rank(k: str) -> tuple:
        return (KEY_ORDER.index(k), "") if k in KEY_ORDER else (len(KEY_ORDER), k)

    out = {}
    for k in sorted(schema, key=rank):
        v = schema[k]
        if k in ("properties",):
            v = {p: _ordered(s) for p, s in v.items()}  # declaration order: meaningful
        elif k == "$defs":
            v = {n: _ordered(v[n]) for n in sorted(v)}
        elif isinstance(v, dict) and k != "examples" and k != "default" and k != "const":
            v = _ordered(v)
        elif k == "anyOf":
            v = [_ordered(s) for s in v]
        out[k] = v
    return out


def _fix_struct(name: str, st: mi.StructType, schema: dict, *, output: bool,
                missing: list[str]) -> None:
    """Descriptions, `v`, the tag, formats, Raw fields, and (output) what is always there."""
    props = schema.get("properties", {})
    tag = st.tag_field
    for f in st.fields:
        p = props[f.encode_name]
        text = field_description(f) or COMMON.get(f.encode_name)
        ftype = _bare(f.type)
        if not text:
            missing.append(f"{name}.{f.encode_name}")
        p["description"] = text or ""
        if f.encode_name == "v":
            p.pop("type", None)
            p["const"] = V
            if output:
                p.pop("default", None)
        if f.encode_name in ("seq", "first", "last") and p.get("type") == "integer":
            p["minimum"] = 1
        inner = ftype.types if isinstance(ftype, mi.UnionType) else (ftype,)
        if any(isinstance(t, mi.DateTimeType) for t in inner):
            p["format"] = "date-time"
        if isinstance(ftype, mi.RawType):
            view = RAW_VIEWS.get((name, f.encode_name))
            p.clear()
            p.update({"description": text or ""})
            if view is not None:
                p["$ref"] = f"#/$defs/{view.__name__}"
            else:
                p["type"] = "object"
    if tag is not None:
        props[tag] = {"description": COMMON["type"], "const": st.tag}
    if output:
        schema["required"] = ([tag] if tag else []) + _always_encoded(st)
    if not schema.get("required"):
        schema.pop("required", None)


def body_schema(body: Body, missing: list[str] | None = None) -> dict:
    """The JSON Schema (2020-12) of one body, self-contained (its Structs in ``$defs``)."""
    missing = [] if missing is None else missing
    views = [v for (s, _), v in RAW_VIEWS.items() if s == body.struct.__name__]
    roots: list[type] = [body.struct, *views]
    _, defs = msgspec.json.schema_components(roots, ref_template="#/$defs/{name}")
    structs: dict[str, mi.StructType] = {}
    kinds: dict[str, type] = {}
    for r in roots:
        _structs(mi.type_info(r), structs, kinds)
    for name, st in structs.items():
        _fix_struct(name, st, defs[name], output=body.output, missing=missing)
    root = defs.pop(body.struct.__name__)
    for name, d in defs.items():  # Structs and enums inside the body
        text = type_description(kinds[name])
        if not text:
            missing.append(name)
        d["description"] = text
    root.update({"$schema": DIALECT, "$id": body.id, "title": body.title,
                 "description": body.description, "examples": [ex for _, _, ex in body.examples]})
    if defs:
        root["$defs"] = defs
    return _ordered(root)


# ------------------------------------------------------------------------------------ AsyncAPI
PARAMS = {
    "hw": {"description": "Hardware id of the device as one routing-key word: every byte outside "
                          "[A-Za-z0-9_-] is percent-encoded (UTF-8, upper-case hex; `.` is `%2E`), "
                          "so a key always has the same number of words. The id itself is "
                          f"{ids.HW_RULE}; a command for any other id is refused.",
           "examples": [HW, "00%3A90%3A33%3A40%3A00%3A01"]},
    "call": {"description": "Call id on the device, a decimal integer; negative for calls the "
                            "application started. In commands: "
                            f"{ids.CALL_RULE}.", "examples": ["17", "-1"]},
    "instance": {"description": "Id of the bridge instance, as one routing-key word "
                                "(percent-encoded like `hw`).", "examples": [INSTANCE]},
    "key": {"description": "The refused command's routing key, unchanged (also a key that is not "
                           "device.<hw>.<verb>).",
            "examples": [routing.COMMAND_KEYS["signaling"].format(hw=HW), "totally.wrong"]},
}
_TP = "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


def _trace(traceparent: str) -> dict:
    return {
        "traceparent": {
            "type": "string", "pattern": _TP,
            "description": f"AMQP header: W3C Trace Context `traceparent`. {traceparent}"},
        "tracestate": {
            "type": "string",
            "description": "AMQP header: W3C Trace Context `tracestate`, next to `traceparent` "
                           "when the trace has one."},
    }


_PROP = "AMQP property"
HEADERS = {
    "EventHeaders": {
        "type": "object",
        "description": "AMQP properties and headers of an event. Entries described as `AMQP "
                       "property` are basic properties of the message; `AMQP header` entries are "
                       "in its headers table. Unknown headers may be added: ignore them.",
        "properties": {
            "content_type": {"const": "application/json", "description": f"{_PROP}."},
            "delivery_mode": {"const": 2, "description": f"{_PROP}: 2, persistent."},
            "type": {"enum": sorted(BY_TYPE),
                     "description": f"{_PROP}: the event name, the same as the body's `type`."},
            "message_id": {"type": "string",
                           "description": f"{_PROP}: `<instance>/<hw>/<seq>` with hw percent-encoded as in the "
                                          "routing key; a duplicate has the same id. "
                                          "Gap events: `<instance>/.gap/<n>` (no device id encodes to `.gap`)."},
            "timestamp": {"type": "integer", "description": f"{_PROP}: the body's `time` in whole "
                          "seconds since the Unix epoch."},
            "app_id": {"const": "epsignal-bridge", "description": f"{_PROP}."},
            **_trace("The creation context of the event (the bridge's span of the PBX frame or command "
                     "that made it), to continue the trace from. "
                     "Present when the bridge runs with tracing on (OTEL_* variables; issue 5)."),
        },
        "required": ["content_type", "delivery_mode", "type", "message_id", "timestamp"],
    },
    "CommandHeaders": {
        "type": "object",
        "description": "AMQP properties and headers of a command, all optional. Any other property "
                       "or header is copied to the dead letter of a refused command.",
        "properties": {
            "reply_to": {"type": "string", "description": f"{_PROP}: queue for the reply (e.g. "
                         "`amq.rabbitmq.reply-to`). Without it no reply is sent; a refused command "
                         "is dead-lettered either way."},
            "correlation_id": {"type": "string", "description": f"{_PROP}: copied into the reply."},
            "content_type": {"const": "application/json", "description": f"{_PROP}: the body is "
                             "read as JSON whatever this says."},
            "message_id": {"type": "string", "description": f"{_PROP}: copied to the dead letter's "
                           "header `x-original-message-id`."},
            **_trace("Optional: with tracing on, the bridge's span of the command continues "
                     "this trace (issue 5)."),
        },
    },
    "ReplyHeaders": {
        "type": "object",
        "description": "AMQP properties of a reply (sent with the default exchange to `reply_to`; "
                       "not persistent).",
        "properties": {
            "content_type": {"const": "application/json", "description": f"{_PROP}."},
            "type": {"const": "reply", "description": f"{_PROP}."},
            "correlation_id": {"type": "string", "description": f"{_PROP}: the command's; absent "
                               "when the command had none."},
        },
        "required": ["content_type", "type"],
    },
    "DeadLetterHeaders": {
        "type": "object",
        "description": "AMQP properties and headers of a dead letter: the refused command's own "
                       "(body, routing key, properties and headers, copied), persistent, plus "
                       "`x-epsignal-error`, with a `message_id` of its own (the command's in "
                       "`x-original-message-id`).",
        "properties": {
            "x-epsignal-error": {
                "type": "string",
                "description": "AMQP header: why the command was refused (the reply's `error`). "
                               "Absent only when the bridge could not publish the copy and the "
                               "commands queue's own dead-lettering moved the command (then "
                               "RabbitMQ's `x-death` header says so)."},
            "delivery_mode": {"const": 2, "description": f"{_PROP}: 2, persistent."},
            "reply_to": {"type": "string", "description": f"{_PROP}: the command's."},
            "correlation_id": {"type": "string", "description": f"{_PROP}: the command's."},
            "message_id": {"type": "string", "description": f"{_PROP}: the dead letter's own, "
                           "`<instance>/.dead/<random>`: unique, whatever the command's was."},
            "x-original-message-id": {
                "type": "string",
                "description": "AMQP header: the command's `message_id`; absent when it had none."},
            **_trace("The command's, when it had one."),
        },
    },
}
HEADERS["InterceptRequestHeaders"] = {
    "type": "object",
    "description": "AMQP properties and headers of an intercept request (not persistent; "
                   "published with `mandatory`).",
    "properties": {
        "content_type": {"const": "application/json", "description": f"{_PROP}."},
        "delivery_mode": {"const": 1, "description": f"{_PROP}: 1, not persistent (a request is "
                          "useless after its deadline)."},
        "type": {"const": "call.intercept", "description": f"{_PROP}."},
        "message_id": {"type": "string", "description": f"{_PROP}: the request's `id`."},
        "correlation_id": {"type": "string", "description": f"{_PROP}: the request's `id`; the "
                           "verdict carries it back."},
        "reply_to": {"type": "string", "description": f"{_PROP}: where the verdict goes (through "
                     "the default exchange): the bridge's direct reply-to queue."},
        "expiration": {"type": "string", "pattern": "^[0-9]+$", "description": f"{_PROP}: the "
                       "deadline in milliseconds: a request still queued then is dropped by the "
                       "broker."},
        "timestamp": {"type": "integer", "description": f"{_PROP}: the body's `time` in whole "
                      "seconds since the Unix epoch."},
        **_trace("The context of the bridge's intercept span, in the call's trace: a decider "
                 "continues it (its verdict's own `traceparent` becomes a link). With tracing on."),
    },
    "required": ["content_type", "type", "message_id", "correlation_id", "reply_to", "expiration"],
}
HEADERS["VerdictHeaders"] = {
    "type": "object",
    "description": "AMQP properties and headers of a verdict.",
    "properties": {
        "correlation_id": {"type": "string", "description": f"{_PROP}: the request's `id` "
                           "(without it the body's `id` is used)."},
        "reply_to": {"type": "string", "description": f"{_PROP}: optional: a bad verdict is "
                     "answered there with a Reply (`ok` false, `command` verdict, `error`)."},
        "content_type": {"const": "application/json", "description": f"{_PROP}: read as JSON "
                         "whatever this says."},
        **_trace("Optional: the decider's context, linked from the bridge's intercept span."),
    },
}
REQUEST_HEADERS = {"content_type": "application/json", "delivery_mode": 1, "type": "call.intercept",
                   "message_id": "bridge-a1/009033400001/i7", "correlation_id": "bridge-a1/009033400001/i7",
                   "reply_to": "amq.rabbitmq.reply-to.g1h2AA5yZXQ", "expiration": "250",
                   "timestamp": int(T0.timestamp()), "traceparent": TRACEPARENT}
VERDICT_HEADERS = {"correlation_id": "bridge-a1/009033400001/i7", "content_type": "application/json"}
DEAD_PAYLOAD = {"description": "The refused command's body, byte for byte (it may not even be "
                               "JSON)."}


def _exchange(name: str) -> dict:
    exchange = {"name": name, "type": "topic", "durable": True, "autoDelete": False, "vhost": "/"}
    return {"amqp": {"is": "routingKey", "exchange": exchange, "bindingVersion": AMQP_BINDING}}


def _camel(name: str) -> str:
    parts = name.replace(".", "-").split("-")
    return parts[0] + "".join(p.title() for p in parts[1:])


def _event_example_headers(b: Body, ex: dict) -> dict:
    if b.name == "gap":
        mid = f"{INSTANCE}/.gap/1"
    else:
        mid = f"{ex['instance']}/{routing.word(ex['hw'])}/{ex['seq']}"
    return {"content_type": "application/json", "delivery_mode": 2, "type": b.name,
            "message_id": mid, "timestamp": int(T0.timestamp()), "app_id": "epsignal-bridge"}


CMD_HEADERS = {"reply_to": "amq.rabbitmq.reply-to", "correlation_id": "7d5e2c1a",
               "content_type": "application/json"}
REPLY_HEADERS = {"content_type": "application/json", "type": "reply", "correlation_id": "7d5e2c1a"}


def _rewrite_refs(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: v.replace("#/$defs/", "#/components/schemas/") if k == "$ref"
                else _rewrite_refs(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rewrite_refs(v) for v in obj]
    return obj


def asyncapi(schemas: dict[str, dict]) -> dict:
    """The AsyncAPI 3.0 document, from the bodies' schemas (keyed by Body.path)."""
    components: dict[str, dict] = {}

    def add(name: str, schema: dict) -> None:
        schema = _rewrite_refs(schema)
        if name in components and components[name] != schema:
            raise ValueError(f"component {name} differs between bodies")
        components[name] = schema

    channels: dict[str, dict[str, Any]] = {}
    operations: dict[str, dict[str, Any]] = {}
    messages: dict[str, dict[str, Any]] = {}
    for b in BODIES:
        s = dict(schemas[b.path])
        for n, d in s.pop("$defs", {}).items():
            add(n, d)
        for k in ("$schema", "$id", "examples"):
            s.pop(k)
        add(b.title, s)
        mid = _camel(b.name) + ("Command" if b.kind == "commands" else "")
        msg: dict[str, Any] = {"name": b.name, "title": b.title, "summary": b.description,
               "contentType": "application/json",
               "payload": {"$ref": f"#/components/schemas/{b.title}"}}
        if b.kind == "events":
            msg["headers"] = {"$ref": "#/components/schemas/EventHeaders"}
            msg["bindings"] = {"amqp": {"messageType": b.name, "bindingVersion": AMQP_BINDING}}
            headers = [_event_example_headers(b, ex) for _, _, ex in b.examples]
        elif b.kind == "commands":
            msg["headers"] = {"$ref": "#/components/schemas/CommandHeaders"}
            msg["correlationId"] = {"$ref": "#/components/correlationIds/command"}
            trace = {"traceparent": TRACEPARENT} if b.name == "signaling" else {}
            headers = [{**CMD_HEADERS, **trace}] * len(b.examples)
        elif b.kind == "request":
            msg["headers"] = {"$ref": "#/components/schemas/InterceptRequestHeaders"}
            msg["correlationId"] = {"$ref": "#/components/correlationIds/intercept"}
            msg["bindings"] = {"amqp": {"messageType": b.name, "bindingVersion": AMQP_BINDING}}
            headers = [REQUEST_HEADERS] * len(b.examples)
        elif b.kind == "verdict":
            msg["headers"] = {"$ref": "#/components/schemas/VerdictHeaders"}
            msg["correlationId"] = {"$ref": "#/components/correlationIds/intercept"}
            headers = [VERDICT_HEADERS] * len(b.examples)
        else:
            msg["headers"] = {"$ref": "#/components/schemas/ReplyHeaders"}
            msg["correlationId"] = {"$ref": "#/components/correlationIds/command"}
            msg["bindings"] = {"amqp": {"messageType": "reply", "bindingVersion": AMQP_BINDING}}
            headers = [REPLY_HEADERS] * len(b.examples)
        msg["examples"] = [{"name": n, "summary": t, "headers": h, "payload": ex}
                           for (n, t, ex), h in zip(b.examples, headers, strict=True)]
        messages[mid] = msg
        if b.kind in ("reply", "verdict"):
            continue
        address = b.address or ""  # only replies and verdicts have none
        params = [p for p in ("hw", "call", "instance") if "{" + p + "}" in address]
        ch_id = mid
        channels[ch_id] = {
            "address": b.address, "title": b.title, "description": b.description,
            "messages": {mid: {"$ref": f"#/components/messages/{mid}"}},
            "parameters": {p: {"$ref": f"#/components/parameters/{p}"} for p in params},
            "bindings": _exchange(COMMANDS_EXCHANGE if b.kind == "commands" else EVENTS_EXCHANGE),
        }
        if b.kind == "request":
            operations["requestVerdict"] = {
                "action": "send", "channel": {"$ref": f"#/channels/{ch_id}"},
                "summary": "The bridge asks for a verdict on a held message (intercept mode) and "
                           "waits for it until the deadline.",
                "messages": [{"$ref": f"#/channels/{ch_id}/messages/{mid}"}],
                "reply": {"address": {"location": "$message.header#/reply_to",
                                      "description": "The request's `reply_to` property."},
                          "channel": {"$ref": "#/channels/verdict"},
                          "messages": [{"$ref": "#/channels/verdict/messages/verdict"}]},
                "bindings": {"amqp": {"deliveryMode": 1, "mandatory": True, "timestamp": True,
                                      "bindingVersion": AMQP_BINDING}},
            }
        elif b.kind == "events":
            operations["publish" + mid[0].upper() + mid[1:]] = {
                "action": "send", "channel": {"$ref": f"#/channels/{ch_id}"},
                "summary": f"The bridge publishes {b.name} events.",
                "messages": [{"$ref": f"#/channels/{ch_id}/messages/{mid}"}],
                "bindings": {"amqp": {"deliveryMode": 2, "mandatory": True, "timestamp": True,
                                      "bindingVersion": AMQP_BINDING}},
            }
        else:
            channels[ch_id]["x-epsignal-queue"] = {
                "name": COMMANDS_QUEUE, "durable": True, "bindingKey": "#",
                "arguments": {"x-queue-type": DEFAULTS.queue_type, "x-dead-letter-exchange": DEAD_EXCHANGE}}
            operations["receive" + mid[0].upper() + mid[1:]] = {
                "action": "receive", "channel": {"$ref": f"#/channels/{ch_id}"},
                "summary": f"The bridge carries out {b.name} commands, one at a time per device, "
                           "and acks each after it was carried out or refused.",
                "messages": [{"$ref": f"#/channels/{ch_id}/messages/{mid}"}],
                "reply": {"address": {"location": "$message.header#/reply_to",
                                      "description": "The command's `reply_to` property."},
                          "channel": {"$ref": "#/channels/reply"},
                          "messages": [{"$ref": "#/channels/reply/messages/reply"}]},
                "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
            }
    channels["reply"] = {
        "address": None, "title": "Reply",
        "description": "Replies go to the command's `reply_to` queue through the default exchange.",
        "messages": {"reply": {"$ref": "#/components/messages/reply"}},
    }
    channels["verdict"] = {
        "address": None, "title": "Verdict",
        "description": "Verdicts go to the request's `reply_to` (the bridge's direct reply-to) "
                       "through the default exchange.",
        "messages": {"verdict": {"$ref": "#/components/messages/verdict"}},
    }
    channels["deadLetter"] = {
        "address": "{key}", "title": "Dead letters",
        "description": f"Every refused command, copied to the exchange `{DEAD_EXCHANGE}` with its "
                       "own routing key, body and properties plus the header `x-epsignal-error`; "
                       "its `message_id` is its own, the command's is in `x-original-message-id`. "
                       f"The durable queue `{DEAD_QUEUE}` (bound with `#`) keeps them.",
        "messages": {"deadLetter": {"$ref": "#/components/messages/deadLetter"}},
        "parameters": {"key": {"$ref": "#/components/parameters/key"}},
        "bindings": _exchange(DEAD_EXCHANGE),
        "x-epsignal-queue": {"name": DEAD_QUEUE, "durable": True, "bindingKey": "#",
                             "arguments": {"x-queue-type": DEFAULTS.queue_type}},
    }
    operations["publishDeadLetter"] = {
        "action": "send", "channel": {"$ref": "#/channels/deadLetter"},
        "summary": "The bridge dead-letters a refused command (after replying, when it had "
                   "`reply_to`).",
        "messages": [{"$ref": "#/channels/deadLetter/messages/deadLetter"}],
        "bindings": {"amqp": {"deliveryMode": 2, "timestamp": False,
                              "bindingVersion": AMQP_BINDING}},
    }
    messages["deadLetter"] = {
        "name": "dead-letter", "title": "Dead letter",
        "summary": "A refused command, with the reason.",
        "headers": {"$ref": "#/components/schemas/DeadLetterHeaders"},
        "payload": {"$ref": "#/components/schemas/DeadLetter"},
        "examples": [{
            "name": "not-attached",
            "summary": "A signaling command for a device that is not attached",
            "headers": {"x-epsignal-error": f"device {HW} is not attached", "delivery_mode": 2,
                        "reply_to": "amq.rabbitmq.reply-to", "correlation_id": "7d5e2c1a"},
            "payload": {"call": -1, "sig": {"type": "setup", "cd": {"num": "201"}}}}],
    }
    for name, schema in HEADERS.items():
        add(name, schema)
    add("DeadLetter", DEAD_PAYLOAD)
    doc = {
        "asyncapi": "3.0.0",
        "id": "urn:epsignal-bridge",
        "info": {
            "title": "epsignal-bridge bus",
            "version": str(V),
            "description": "Events and commands of epsignal-bridge, which bridges an "
                           "innovaphone PBX's EpSignal call signaling to RabbitMQ. Operations are "
                           "the bridge's: consumers receive what it sends and send what it "
                           "receives. Generated from the bridge's Structs by `epsignal-bridge "
                           "contracts`; the JSON Schemas of the bodies are in contracts/" + VDIR +
                           "/. Exchange and queue names are the defaults "
                           "(EPSIGNAL_*_EXCHANGE/_QUEUE change them). docs/CONSUMERS.md explains "
                           "ordering, duplicates, gaps and dead letters.",
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {"rabbitmq": {
            "host": "localhost:5672", "protocol": "amqp", "protocolVersion": "0.9.1",
            "description": "The broker of EPSIGNAL_AMQP_URL (amqps:// works too)."}},
        "channels": channels,
        "operations": {k: operations[k] for k in sorted(operations)},
        "components": {
            "schemas": {k: _ordered(components[k]) for k in sorted(components)},
            "messages": {k: messages[k] for k in sorted(messages)},
            "parameters": {k: PARAMS[k] for k in sorted(PARAMS)},
            "correlationIds": {"command": {
                "description": "The command's `correlation_id`, copied into its reply.",
                "location": "$message.header#/correlation_id"}, "intercept": {
                "description": "The intercept request's `id`, as the request's and the verdict's "
                               "`correlation_id`.",
                "location": "$message.header#/correlation_id"}},
        },
    }
    doc["channels"] = {k: channels[k] for k in sorted(channels)}
    return doc


# ------------------------------------------------------------------------------------ files
def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def generate() -> dict[str, bytes]:
    """Every generated file: path relative to contracts/ -> bytes."""
    missing: list[str] = []
    schemas = {b.path: body_schema(b, missing) for b in BODIES}
    if missing:
        raise ValueError("without a description (a field's Meta(description=...), a Struct's docstring): "
                         + ", ".join(sorted(set(missing))))
    files = {p: _dump(s) for p, s in schemas.items()}
    files["asyncapi.json"] = _dump(asyncapi(schemas))
    return dict(sorted(files.items()))


def _generated_here(root: Path) -> set[str]:
    """Files in ``root`` that the generator owns (other major versions are left alone)."""
    out = {"asyncapi.json"} if (root / "asyncapi.json").exists() else set()
    vdir = root / VDIR
    if vdir.is_dir():
        out |= {p.relative_to(root).as_posix() for p in vdir.rglob("*") if p.is_file()}
    return out


def write(root: Path) -> list[str]:
    """Write the contracts into ``root``; the paths that changed (stale files are removed)."""
    files = generate()
    changed = []
    for rel in sorted(_generated_here(root) - set(files)):
        (root / rel).unlink()
        changed.append(rel)
    for rel, data in files.items():
        p = root / rel
        if not p.exists() or p.read_bytes() != data:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            changed.append(rel)
    return sorted(changed)


def check(root: Path, context_lines: int = 20) -> list[str]:
    """Differences between ``root`` and a fresh generation, as readable lines (empty: none)."""
    files = generate()
    out = []
    for rel in sorted(_generated_here(root) - set(files)):
        out.append(f"extra (not generated): {rel}")
    for rel, data in files.items():
        p = root / rel
        if not p.exists():
            out.append(f"missing: {rel}")
            continue
        have = p.read_bytes()
        if have != data:
            diff = list(difflib.unified_diff(have.decode(errors="replace").splitlines(),
                                             data.decode().splitlines(), f"committed/{rel}",
                                             f"generated/{rel}", lineterm="", n=1))
            out.append(f"differs: {rel} ({len(diff)} diff lines)")
            out.extend("    " + line for line in diff[:context_lines])
            if len(diff) > context_lines:
                out.append(f"    ... {len(diff) - context_lines} more")
    return out


def default_dir() -> Path:
    """``contracts/`` of the source checkout the bridge runs from, else ``./contracts``."""
    repo = Path(__file__).resolve().parents[1]
    return repo / "contracts" if (repo / "pyproject.toml").exists() else Path("contracts")
