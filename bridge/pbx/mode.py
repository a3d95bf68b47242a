"""What the bridge needs of its PBX side, whichever way the sessions are made.

- client mode, :class:`bridge.pbx.client.ClientPbx`: the bridge connects, one AppWebsocket
  session per device (a :class:`~bridge.pbx.client.DeviceRunner` each);
- server mode, :class:`bridge.pbx.server.PbxServer`: the PBX's App object connects in, and one
  session carries every device.

The service talks to either through :class:`Pbx` and never asks which one it has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bridge.device import Device
    from bridge.pbx.session import PbxSession
    from bridge.protocol import messages as m


class AttachFailed(Exception):
    """An attach did not succeed; the message says why, for the command's reply. ``refused``:
    the PBX answered with an error (the device is not wanted any more), as opposed to no answer."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class CannotDetach(Exception):
    """This mode cannot detach one device (server mode: one session carries them all)."""


class Pbx(Protocol):
    async def start(self) -> None:
        """Begin attaching the configured devices (client mode without leases: now; server
        mode: on every PBX session that logs in)."""

    async def stop(self) -> None:
        """Close every session; the attached devices' ``detached`` events are emitted."""

    async def attach(self, hw: str, timeout: float) -> tuple[m.AttachResult, Device]:
        """Attach ``hw`` (or find it attached); its AttachResult, or AttachFailed."""

    async def attached(self, hw: str, timeout: float) -> bool:
        """Whether ``hw`` is attached, waiting up to ``timeout`` for the PBX's Attached."""

    async def release(self, hw: str, reason: str) -> bool:
        """Detach ``hw`` (end its session), emitting ``detached(reason)``. Whether it was
        attached. CannotDetach where the mode cannot."""

    def target(self, hw: str) -> tuple[Device, PbxSession] | None:
        """The attached device and its open session, for signaling on its behalf."""

    def devices_up(self) -> list[tuple[Device, bool]]:
        """(device, its PBX session is up) for every device the bridge wants attached."""

    def problems(self) -> list[str]:
        """Why the PBX side is not ready (empty: ready)."""

    @property
    def reconnects(self) -> int: ...

    @property
    def login_failures(self) -> int: ...
