"""A simulated device: identity, registration, and the application session attached to it."""

from __future__ import annotations

from msgspec import UNSET, UnsetType

from bridge.sim.calls import AppLink, Call
from bridge.sim.config import hw_id


class Device:
    """A simulated phone (a :class:`bridge.sim.calls.Line` to its calls)."""

    __slots__ = ("calls", "dn", "ext", "hw", "index", "registered", "session", "sip", "src")

    def __init__(self, index: int, registered: bool, hw: str | None = None) -> None:
        self.index = index
        self.hw = hw if hw is not None else hw_id(index)
        self.ext = str(1000 + index)
        self.sip = f"user{index:04d}"
        self.dn = f"User {index}"
        self.registered = registered
        #: the application session holding the attachment (None: not attached)
        self.session: AppLink | None = None
        #: the Attach's src, echoed on everything sent for this device
        self.src: str | UnsetType = UNSET
        #: the device's calls by id (negative ids: started by the application)
        self.calls: dict[int, Call] = {}

    @property
    def in_path(self) -> bool:
        """The application is in the signaling path: attached and registered."""
        return self.session is not None and self.registered
