"""The typed view of an innovaphone JSON Signaling object (``sig``).

The bridge never re-encodes a ``sig``: it keeps the received bytes (``msgspec.Raw``) and forwards
and publishes those. This module only reads the few fields the bridge needs (``type``, ``cg``,
``cd``, ``cau``, ``channel`` and the facilities in ``fty``); every other field is ignored here and
kept untouched in the raw bytes.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, Struct, UnsetType

from bridge.protocol import errors


class Party(Struct, kw_only=True):
    """An endpoint (``cg`` calling, ``cd`` called): number and SIP user."""

    num: str | UnsetType = UNSET
    sip: str | UnsetType = UNSET


class Cause(Struct, kw_only=True, omit_defaults=True):
    """A Q.931 cause: ``num`` is the cause value, ``loc`` its location (undocumented type)."""

    num: int | None = None
    loc: Any = None


class Facility(Struct, kw_only=True):
    """One entry of ``fty``. Only ``type`` and the name of ``name_identification`` are read."""

    type: str
    name: str | UnsetType = UNSET


class Sig(Struct, kw_only=True):
    type: str
    cg: Party | UnsetType = UNSET
    cd: Party | UnsetType = UNSET
    cau: Cause | UnsetType = UNSET
    channel: int | UnsetType = UNSET
    fty: list[Facility] | UnsetType = UNSET

    def facilities(self) -> list[Facility]:
        return self.fty if self.fty is not UNSET else []

    def display_name(self) -> str | None:
        for f in self.facilities():
            if f.type == "name_identification" and f.name is not UNSET:
                return f.name
        return None


_decoder = msgspec.json.Decoder(Sig)


def decode_sig(raw: bytes | msgspec.Raw) -> Sig:
    """The typed view of a raw ``sig``; raises FrameError naming the bad field."""
    return errors.decode(_decoder, raw, at="$.sig")
