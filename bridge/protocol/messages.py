"""AppWebsocket and EpSignal messages as msgspec Structs, and the one codec for frames.

Every frame is one JSON object whose ``mt`` names its type; the frame decoder is a single
tagged-union decoder, so a frame is parsed once, straight into the right Struct. Fields that a
message may lack are ``UNSET`` (left out when encoded), so what we send looks like what the
innovaphone SDK documents and nothing is invented.

``sig`` (the Signal object) and ``AppLogin.info`` are kept as ``msgspec.Raw``: the exact bytes
that arrived. That makes Signaling lossless by construction (every field, known or not, is
forwarded and published byte for byte) and lets a verifier hash ``info`` exactly as received.
The typed view of ``sig`` that the bridge reads is in :mod:`bridge.protocol.signal`.
"""

from __future__ import annotations

from enum import Enum
from functools import cached_property
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from bridge.protocol.errors import DECODE_ERRORS, FrameError, decode_error
from bridge.protocol.signal import Sig, decode_sig

API: Final = "EpSignal"
#: Default limit for one frame; the WebSocket layer enforces the same limit before we see it.
MAX_FRAME_BYTES = 256 * 1024


class CallState(str, Enum):  # noqa: UP042 (str() of a member stays 'CallState.x' in logs)
    """State of a call. `null`: not known yet (a call first seen mid-call); `disconnected`: the
    remote side hung up; `disconnecting`: the device hung up; `released`: the call is gone (the
    last event of a call)."""

    # ``Sync.info.state`` as the PBX reports it, plus ``released`` (the tracker's end state)

    NULL = "null"
    SETUP = "setup"
    SETUP_ACK = "setup-ack"
    CALL_PROC = "call-proc"
    ALERT = "alert"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # the remote side hung up
    DISCONNECTING = "disconnecting"  # the device hung up
    PARKED = "parked"
    RELEASED = "released"  # the call is gone; never sent by the PBX


class Message(Struct, tag_field="mt", tag=True, kw_only=True):
    """Base of every frame: ``mt`` is the tag, ``src`` is echoed by the PBX in answers."""

    src: str | UnsetType = UNSET


# ---------------------------------------------------------------- AppWebsocket login
class AppChallenge(Message, kw_only=True):
    pass


class AppChallengeResult(Message, kw_only=True):
    challenge: str


class AppLogin(Message, kw_only=True):
    app: str
    domain: str = ""
    sip: str = ""
    guid: str = ""
    dn: str = ""
    digest: str
    #: kept as the bytes received: the digest covers them exactly
    info: Raw | UnsetType = UNSET
    pbxObj: str | UnsetType = UNSET


class AppLoginResult(Message, kw_only=True):
    ok: bool = False
    error: str | UnsetType = UNSET


# ---------------------------------------------------------------- EpSignal
class EpSignalMessage(Message, kw_only=True):
    api: Literal["EpSignal"] = API


class Attach(EpSignalMessage, kw_only=True):
    hw: str


class AttachResult(EpSignalMessage, kw_only=True):
    #: present (any JSON value, its type is undocumented) means the Attach failed
    err: Any | UnsetType = UNSET
    stun: str | UnsetType = UNSET
    turn: str | UnsetType = UNSET
    turnUsr: str | UnsetType = UNSET
    turnPwd: str | UnsetType = UNSET  # a secret: never logged, never published
    prefixIntl: str | UnsetType = UNSET
    prefixNtl: str | UnsetType = UNSET
    prefixSubs: str | UnsetType = UNSET
    area: str | UnsetType = UNSET
    country: str | UnsetType = UNSET
    maxIntern: Any | UnsetType = UNSET  # newer releases, undocumented (integers so far)
    tones: Any | UnsetType = UNSET  # newer releases, undocumented (integers so far)

    @property
    def failed(self) -> bool:
        return self.err is not UNSET

    def __repr__(self) -> str:  # keep the TURN password out of any log line
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        if fields.get("turnPwd") is not UNSET:
            fields["turnPwd"] = "***"
        return "AttachResult(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


class Attached(EpSignalMessage, kw_only=True):
    pass


class Detached(EpSignalMessage, kw_only=True):
    pass


class Remote(Struct, kw_only=True, omit_defaults=True):
    """The remote party of a call."""

    num: Annotated[str | None, Meta(description="Number.")] = None
    sip: Annotated[str | None, Meta(description="SIP user name.")] = None
    dn: Annotated[str | None, Meta(description="Display name.")] = None


class Info(Struct, kw_only=True):
    channel: int | UnsetType = UNSET
    #: true: a call to the device
    in_: bool | UnsetType = msgspec.field(default=UNSET, name="in")
    state: CallState | None = None
    remote: Remote | UnsetType = UNSET


class Sync(EpSignalMessage, kw_only=True):
    call: int
    info: Info


class Signaling(EpSignalMessage, kw_only=True, dict=True):
    call: int
    #: the Signal object, byte for byte as received (lossless)
    sig: Raw
    #: present and true: toward the device
    to: bool | UnsetType = UNSET

    @cached_property
    def signal(self) -> Sig:
        """The typed view of ``sig`` (decoded once, on first use). Raises FrameError."""
        return decode_sig(self.sig)


Frame = (
    AppChallenge
    | AppChallengeResult
    | AppLogin
    | AppLoginResult
    | Attach
    | AttachResult
    | Attached
    | Detached
    | Sync
    | Signaling
)

_decoder = msgspec.json.Decoder(Frame)
_encoder = msgspec.json.Encoder()


def decode(frame: bytes | str, max_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """Decode one frame into its Struct, in one pass. Every failure is a :class:`FrameError`."""
    if len(frame) > max_bytes:
        raise FrameError("too-large", f"frame of {len(frame)} bytes exceeds the limit of {max_bytes}")
    try:
        msg = _decoder.decode(frame)
    except DECODE_ERRORS as exc:
        e = decode_error(exc)
        text = e.detail  # two failures at the frame's top get a kind of their own
        if text.startswith("Expected `object`") and "- at `$" not in text:  # the frame itself
            e = FrameError("not-object", f"a frame must be a JSON object ({text})")
        elif text.startswith("Invalid value") and text.endswith("`$.mt`"):
            e = FrameError("unknown-mt", f"unknown message type ({text})")
        raise e from None
    if type(msg) is Signaling and bytes(memoryview(msg.sig)[:1]) != b"{":
        raise FrameError("invalid", "Expected `object` - at `$.sig`")
    return msg


def encode(msg: Message) -> bytes:
    """Encode one message as a compact JSON frame (UTF-8 bytes, sent as a text frame)."""
    return _encoder.encode(msg)
