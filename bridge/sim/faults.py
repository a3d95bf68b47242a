"""The simulated PBX's faults: those in force (:class:`Faults`), and the malformed frames it sends
on demand (the ``send_garbage`` fault).

Each garbage frame is a text frame an application must survive: not JSON, JSON that is not an
object, an unknown ``mt``, and known message types with fields of the wrong type.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Faults:
    """The faults in force (the control API's ``POST /faults``)."""

    #: every login fails, whatever the digest
    refuse_logins: bool = False
    #: every frame to the application is held back this many milliseconds
    delay_ms: int = 0


GARBAGE: tuple[bytes, ...] = (
    b"this is not json",
    b"[1,2,3]",
    b'{"api":"EpSignal","mt":"NoSuchMessage","src":"garbage"}',
    b'{"api":"EpSignal","mt":"Signaling","call":"seventeen","sig":{"type":"alert"}}',
    b'{"api":"EpSignal","mt":"Sync","call":1,"info":"not an object"}',
    b'{"api":"EpSignal","mt":"Attached","src":42}',
    b'{"api":"EpSignal","mt":"Signaling","call":1,"sig":"rel"}',
    b'"just a string"',
    b'{"api":"EpSignal","mt":"AttachResult","stun":["a","b"]}',
    b'{"api":"EpSignal","mt":"Signaling","call":1,"sig":{"type":',
)


def garbage_frames(count: int) -> list[bytes]:
    """``count`` malformed frames, cycling through :data:`GARBAGE`."""
    if count < 0:
        raise ValueError("count must not be negative")
    return [GARBAGE[i % len(GARBAGE)] for i in range(count)]
