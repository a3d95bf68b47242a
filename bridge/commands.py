"""Commands from the bus and the replies to them: bodies as msgspec Structs, decoding with clear
errors. Pure.

A command's routing key is ``device.<hw>.<verb>`` on the commands exchange; the verb decides the
body:

- ``attach``, ``detach``: empty, or a JSON object (``{}``).
- ``signaling``: ``{"call": int, "to": bool, "sig": {...}}``: a Signaling message sent toward the
  device (``to`` true) or the PBX (``to`` false/absent) on the device's behalf. Negative call
  ids are for calls the application starts. ``sig`` passes through byte for byte.
- ``intercept``: ``{"rules": [{"type": "setup", "to": true, ...}]}``: the device's intercept
  rules (:class:`bridge.intercept.InterceptCommand`; docs/INTERCEPT.md); the reply lists the
  device's effective rules.

The hw id of the key and the call id must be valid (:mod:`bridge.ids`), and the body must be
UTF-8 (RFC 8259): ``sig`` goes to the PBX in a WebSocket text frame, which must be UTF-8 (RFC
6455, a PBX fails the connection otherwise), and msgspec does not check the strings it skips.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from bridge import ids, routing
from bridge import intercept as ic
from bridge.events import SCHEMA_VERSION, AttachInfo
from bridge.protocol import errors
from bridge.protocol.errors import FrameError
from bridge.protocol.signal import SIG_TEXT, decode_sig

VERBS = routing.VERBS
MAX_COMMAND_BYTES = 64 * 1024


class CommandError(Exception):
    """A command that cannot be carried out; the text is the reason given to the sender."""


class AttachCommand(Struct, kw_only=True):
    v: int = SCHEMA_VERSION


class DetachCommand(Struct, kw_only=True):
    v: int = SCHEMA_VERSION


class SignalingCommand(Struct, kw_only=True, forbid_unknown_fields=True):
    """Strict: a misspelt field (``To`` for ``to``) would send the message the wrong way, so an
    unknown field is refused, named."""

    call: Annotated[ids.CallId, Meta(description=
        "Call id on the device. Negative: a call the application starts (click to dial: a `setup` toward the PBX "
        f"with call -1). Valid: {ids.CALL_RULE}.")]
    sig: Annotated[Raw, Meta(description=
        SIG_TEXT + " Must be an object with a string `type`; the fields the bridge reads must have the types below.")]
    to: Annotated[bool, Meta(description="True: send toward the device; false or absent: toward the PBX.")] = False
    v: int = SCHEMA_VERSION


class Reply(Struct, kw_only=True):
    """The answer to a command with ``reply_to``. Optional fields are left out, not null."""

    ok: Annotated[bool, Meta(description=
        "True: carried out; false: refused (see `error`; the command was also dead-lettered).")]
    v: int = SCHEMA_VERSION
    command: Annotated[str | UnsetType, Meta(description=
        "The verb of the command (`attach`, `detach`, `signaling`); absent when the routing key names none of "
        "them.")] = UNSET
    hw: Annotated[ids.HwId | UnsetType, Meta(description=
        "The device the command was for; absent when the routing key names no valid hw id.")] = UNSET
    error: Annotated[str | UnsetType, Meta(description=
        "Why the command was refused (also the dead letter's `x-epsignal-error`).")] = UNSET
    attach: Annotated[AttachInfo | UnsetType, Meta(description=
        "attach: what the PBX answered (without the TURN password).")] = UNSET
    attached: Annotated[bool | UnsetType, Meta(description=
        "attach: true when the device is registered and attached now; false: it will be attached when it registers "
        "(an `attached` event says so).")] = UNSET
    was_attached: Annotated[bool | UnsetType, Meta(description=
        "detach: the device was attached when the command came.")] = UNSET
    rules: Annotated[list[ic.Effective] | UnsetType, Meta(description=
        "intercept: the device's effective intercept rules now (the command's and the configuration's, every option "
        "decided).")] = UNSET


_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    "attach": msgspec.json.Decoder(AttachCommand),
    "detach": msgspec.json.Decoder(DetachCommand),
    "signaling": msgspec.json.Decoder(SignalingCommand),
    "intercept": msgspec.json.Decoder(ic.InterceptCommand),
}
_reply_encoder = msgspec.json.Encoder()

Command = AttachCommand | DetachCommand | SignalingCommand | ic.InterceptCommand


def parse(routing_key: str, body: bytes) -> tuple[str, str, Command]:
    """(hw, verb, command) from a delivery; raises CommandError naming what is wrong."""
    parsed = routing.parse_command_key(routing_key)
    if parsed is None:
        raise CommandError(
            f"routing key {routing_key!r} is not device.<hw>.<verb> with verb one of {', '.join(VERBS)}"
        )
    hw, verb = parsed
    if verb not in _decoders:
        raise CommandError(f"unknown command {verb!r} in routing key; expected one of {', '.join(VERBS)}")
    bad_hw = ids.hw_error(hw)
    if bad_hw is not None:
        raise CommandError(f"routing key {routing_key[:300]!r}: {bad_hw}")
    if len(body) > MAX_COMMAND_BYTES:
        raise CommandError(f"body of {len(body)} bytes exceeds the limit of {MAX_COMMAND_BYTES}")
    try:
        body.decode("utf-8")  # a copy, but commands are few: not the hot path
    except UnicodeDecodeError as e:
        raise CommandError(f"{verb} command body is not valid UTF-8 (byte 0x{body[e.start]:02x} at "
                           f"{e.start}: {e.reason}); JSON must be UTF-8") from None
    if verb in ("attach", "detach") and not body.strip():
        body = b"{}"
    try:
        cmd = errors.decode(_decoders[verb], body)
    except FrameError as e:
        raise CommandError(f"{verb} command body is not JSON: {e.detail}" if e.kind == "not-json"
                           else f"invalid {verb} command: {e.detail}") from None
    if cmd.v != SCHEMA_VERSION:
        raise CommandError(f"unsupported schema version v={cmd.v} (this bridge speaks v={SCHEMA_VERSION})")
    if isinstance(cmd, SignalingCommand):
        if cmd.call == 0:
            raise CommandError(f"invalid signaling command: call id 0 names no call; a call id is "
                               f"{ids.CALL_RULE} - at `$.call`")
        if bytes(memoryview(cmd.sig)[:1]) != b"{":
            raise CommandError("invalid signaling command: Expected `object` - at `$.sig`")
        try:
            decode_sig(cmd.sig)
        except FrameError as e:
            raise CommandError(f"invalid signaling command: {e.detail}") from None
    return hw, verb, cmd


def encode_reply(reply: Reply) -> bytes:
    return _reply_encoder.encode(reply)


def error_reply(error: str, command: str | None = None, hw: str | None = None) -> Reply:
    return Reply(ok=False, error=error, command=command or UNSET, hw=hw if hw is not None else UNSET)

