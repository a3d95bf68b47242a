"""The typed view of an innovaphone JSON Signaling object (``sig``).

The bridge never re-encodes a ``sig``: it keeps the received bytes (``msgspec.Raw``) and forwards
and publishes those. This module only reads the few fields the bridge needs (``type``, ``cg``,
``cd``, ``cau``, ``channel`` and the facilities in ``fty``); every other field is ignored here and
kept untouched in the raw bytes.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from bridge.protocol import errors

#: what a raw ``sig`` field of a published or accepted body is (the contracts' description)
SIG_TEXT = ("The EpSignal Signal object exactly as it passed, byte for byte: every field, known or "
            "unknown to the bridge, passes through losslessly. Fields as in the innovaphone JSON "
            "signaling (`type`, `cg`, `cd`, `cau`, `channel`, `fty`, ...).")


class Party(Struct, kw_only=True):
    """An endpoint of a call (`cg` calling, `cd` called)."""

    num: Annotated[str | UnsetType, Meta(description="Number.")] = UNSET
    sip: Annotated[str | UnsetType, Meta(description="SIP user name.")] = UNSET


class Cause(Struct, kw_only=True, omit_defaults=True):
    """A Q.931 cause."""

    num: Annotated[int | None, Meta(description="Q.931 cause value (16: normal clearing, 17: busy, ...).")] = None
    loc: Annotated[Any, Meta(description="Cause location, as the PBX sent it (type undocumented).")] = None


class Facility(Struct, kw_only=True):
    """One entry of `fty`."""

    # only ``type`` and the name of ``name_identification`` are read

    type: Annotated[str, Meta(description="Facility type.")]
    name: Annotated[str | UnsetType, Meta(description="The name, for `name_identification`.")] = UNSET


class Sig(Struct, kw_only=True):
    """The Signal object of an EpSignal Signaling message (the fields the bridge reads; any
    other field is passed on untouched)."""

    type: Annotated[str, Meta(description=
        "Message type: `setup`, `setup_ack`, `call_proc`, `alert`, `conn`, `disc`, `rel`, `info`, ...")]
    cg: Annotated[Party | UnsetType, Meta(description="Calling party.")] = UNSET
    cd: Annotated[Party | UnsetType, Meta(description="Called party.")] = UNSET
    cau: Annotated[Cause | UnsetType, Meta(description="Q.931 cause (`disc`, `rel`).")] = UNSET
    channel: Annotated[int | UnsetType, Meta(description="Media channel.")] = UNSET
    fty: Annotated[list[Facility] | UnsetType, Meta(description=
        "Facilities (`name_identification`, `hold_notify`, `retrieve_notify`, `cp_park`, ...).")] = UNSET

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
