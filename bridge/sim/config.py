"""The simulator's configuration and its device numbering.

Devices are numbered from 1. Device ``i`` has the hardware id ``"00903340" + f"{i:04d}"`` (12
characters, like an innovaphone MAC address: ``009033400001``, ``009033400002`` ...), the
extension ``str(1000 + i)``, the SIP user ``f"user{i:04d}"`` and the display name ``f"User {i}"``.
The first ``devices`` are registered at start, the next ``unregistered`` are known to the PBX but
not registered (an Attach to them answers ok, ``Attached`` comes when they register).
"""

from __future__ import annotations

from dataclasses import dataclass

HW_PREFIX = "00903340"
MAX_DEVICES = 9999


def hw_id(index: int) -> str:
    """The hardware id of device ``index`` (1-based)."""
    if not 1 <= index <= MAX_DEVICES:
        raise ValueError(f"device index {index} out of range 1..{MAX_DEVICES}")
    return f"{HW_PREFIX}{index:04d}"


def hw_index(hw: str) -> int | None:
    """The index of a hardware id of the simulator's scheme, None for any other string."""
    if len(hw) != 12 or not hw.startswith(HW_PREFIX):
        return None
    tail = hw[8:]
    if not tail.isascii() or not tail.isdigit():
        return None
    return int(tail) or None


@dataclass
class SimConfig:
    app: str = "epsignal"
    password: str = "secret"
    #: registered devices 009033400001 ...
    devices: int = 100
    #: known-but-unregistered devices after the registered ones (for late-attach tests)
    unregistered: int = 0
    #: random calls per second over all registered devices (0: no random traffic)
    call_rate: float = 0.0
    #: mean connected time of random calls, seconds
    call_duration_s: float = 2.0
    #: time a device rings before answering, seconds
    ring_s: float = 0.3
    #: a message not forwarded by the application within this many seconds stalls its call
    stall_timeout_s: float = 5.0
    #: seed of the random traffic (None: not reproducible)
    seed: int | None = None
    #: more registered devices with hardware ids of any form (e.g. "00:90:33.40 01"), numbered
    #: after the others, for tests of ids that need escaping in routing keys
    extra_hw: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.devices < 0 or self.unregistered < 0:
            raise ValueError("devices and unregistered must not be negative")
        if self.devices + self.unregistered + len(self.extra_hw) > MAX_DEVICES:
            raise ValueError(f"at most {MAX_DEVICES} devices (devices + unregistered)")
        if self.call_rate < 0:
            raise ValueError("call_rate must not be negative")
        if self.call_duration_s < 0 or self.ring_s < 0:
            raise ValueError("call_duration_s and ring_s must not be negative")
        if self.stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be positive")


def remote_sip(num: str) -> str:
    """The SIP user of a simulated remote party (``201`` -> ``r201``)."""
    return f"r{num}"


def remote_dn(num: str) -> str:
    """The display name of a simulated remote party (``201`` -> ``Remote 201``)."""
    return f"Remote {num}"
