"""innovaphone JSON Signaling objects (``sig``) as the simulated ends send them.

Plain dicts, encoded once per message with one shared encoder. Shapes follow the innovaphone
JSON signaling documentation: ``setup`` carries ``bc`` ``8090a2`` (with media), ``cg``/``cd``
``{"num","sip"}``, ``complete``, ``channel`` -1, a ``name_identification`` facility and the
caller's media ``channels``; ``alert``/``conn`` carry ``channels``; ``disc``/``rel`` carry ``cau``.
"""

from __future__ import annotations

from typing import Any

import msgspec

Sig = dict[str, Any]

_encoder = msgspec.json.Encoder()
encode_sig = _encoder.encode

#: causes used by the simulator (Q.931 values)
NORMAL = 16
BUSY = 17
SUBSCRIBER_ABSENT = 20
#: the simulator's own cause for a call released because the application did not forward
STALLED = 102


def party(num: str, sip: str) -> dict[str, str]:
    return {"num": num, "sip": sip}


def cause(num: int, loc: str = "user") -> dict[str, Any]:
    return {"num": num, "loc": loc}


def channels(port: int) -> dict[str, Any]:
    return {"source": "local", "ch": [{"coder": "G711A", "addr": "127.0.0.1", "port": port}]}


def name_id(name: str) -> list[dict[str, str]]:
    return [{"type": "name_identification", "name": name}]


def setup(cg: dict[str, str], cd: dict[str, str], name: str, port: int) -> Sig:
    return {
        "type": "setup",
        "bc": "8090a2",
        "cg": cg,
        "cd": cd,
        "complete": True,
        "channel": -1,
        "fty": name_id(name),
        "channels": channels(port),
    }


def call_proc() -> Sig:
    return {"type": "call_proc", "channel": -1}


def alert(name: str, port: int) -> Sig:
    return {"type": "alert", "channel": -1, "fty": name_id(name), "channels": channels(port)}


def conn(name: str, port: int) -> Sig:
    return {"type": "conn", "channel": -1, "fty": name_id(name), "channels": channels(port)}


def facility(*fty: dict[str, Any]) -> Sig:
    return {"type": "facility", "fty": list(fty)}


def disc(num: int = NORMAL, loc: str = "user") -> Sig:
    return {"type": "disc", "cau": cause(num, loc)}


def rel(num: int = NORMAL, loc: str = "user") -> Sig:
    return {"type": "rel", "cau": cause(num, loc)}
