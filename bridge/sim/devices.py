"""A simulated device: identity, registration, and the application session attached to it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from msgspec import UNSET, UnsetType

from bridge.sim.config import hw_id

if TYPE_CHECKING:
    from bridge.sim.calls import Call
    from bridge.sim.session import Session


class Device:
    __slots__ = ("calls", "dn", "ext", "hw", "index", "registered", "session", "sip", "src")

    def __init__(self, index: int, registered: bool, hw: str | None = None) -> None:
        self.index = index
        self.hw = hw if hw is not None else hw_id(index)
        self.ext = str(1000 + index)
        self.sip = f"user{index:04d}"
        self.dn = f"User {index}"
        self.registered = registered
        #: the application session holding the attachment (None: not attached)
        self.session: Session | None = None
        #: the Attach's src, echoed on everything sent for this device
        self.src: str | UnsetType = UNSET
        #: the device's calls by id (negative ids: started by the application)
        self.calls: dict[int, Call] = {}

    @property
    def in_path(self) -> bool:
        """The application is in the signaling path: attached and registered."""
        return self.session is not None and self.registered


def remote_sip(num: str) -> str:
    """The SIP user of a simulated remote party (``201`` -> ``r201``)."""
    return f"r{num}"


def remote_dn(num: str) -> str:
    """The display name of a simulated remote party (``201`` -> ``Remote 201``)."""
    return f"Remote {num}"
