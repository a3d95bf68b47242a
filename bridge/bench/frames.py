"""Realistic EpSignal Signaling frames for the load generator and the codec benchmark.

Every device runs the same call cycle over and over, each call with a new id (an incoming call,
answered, the remote side hangs up)::

    >setup  <alert  <conn  >disc  <rel        (> toward the device, < from the device)

The sig objects are the simulator's (:mod:`bridge.sim.sigs`: ``bc``, ``cg``/``cd``, name
identification, media ``channels``, causes), so sizes and shapes match what the bridge sees
from the simulator. Every message of the cycle changes the call's state, so each frame makes
exactly :data:`EVENTS_PER_FRAME` events: one ``call.signaling`` and one ``call.state`` (with
``EPSIGNAL_EVENT_KINDS`` limiting the kinds: :func:`events_per_frame`).

A benchmark frame carries its send time as an unknown field of the sig, ``"bench_t":<ns>``
(``time.monotonic_ns()``, CLOCK_MONOTONIC, the same clock in every process of the machine).
The bridge passes a sig byte for byte, so the stamp arrives both in the forwarded frame and in
the ``call.signaling`` event. Command frames carry ``"bench_c":<ns>`` instead.
"""

from __future__ import annotations

from bridge.sim import sigs

#: events the bridge publishes per frame of the cycle with every kind on (call.signaling + call.state)
EVENTS_PER_FRAME = 2
#: the kinds of event a frame of the cycle makes (one each)
FRAME_KINDS = ("call.signaling", "call.state")
STAMP = b'"bench_t":'
COMMAND_STAMP = b'"bench_c":'
HW_PREFIX = "0090335"


def hw_id(i: int) -> str:
    """Hardware id of load-generator device ``i`` (0-based; 12 characters, up to 99,999)."""
    return f"{HW_PREFIX}{i:05d}"


def cycle(index: int) -> list[tuple[bool, dict]]:
    """The call cycle of device ``index`` as (toward the device, sig) pairs."""
    ext, user, name = str(1000 + index % 9000), f"user{index:05d}", f"User {index}"
    return [
        (True, sigs.setup(sigs.party("201", "r201"), sigs.party(ext, user), "Remote 201", 5006)),
        (False, sigs.alert(name, 5004)),
        (False, sigs.conn(name, 5004)),
        (True, sigs.disc()),
        (False, sigs.rel()),
    ]


class FrameMaker:
    """Builds the frames of one device fast: fixed byte templates, only call id and stamp vary."""

    __slots__ = ("call", "prefix", "step", "steps")

    def __init__(self, hw: str, index: int) -> None:
        self.prefix = b'{"mt":"Signaling","api":"EpSignal","src":"' + hw.encode() + b'","call":'
        self.steps = []
        for to, sig in cycle(index):
            body = sigs.encode_sig(sig)  # b'{"type":...}'
            self.steps.append((b',"to":true,"sig":{' if to else b',"sig":{', body[1:] + b"}"))
        self.step = 0
        self.call = 1

    def next(self, stamp_ns: int | None) -> bytes:
        """The next frame of the cycle; with ``stamp_ns`` it carries ``"bench_t"``."""
        mid, tail = self.steps[self.step]
        call = self.call
        self.step += 1
        if self.step == len(self.steps):
            self.step = 0
            self.call += 1
        if stamp_ns is None:
            return b"".join((self.prefix, str(call).encode(), mid, tail))
        return b"".join((self.prefix, str(call).encode(), mid, STAMP, str(stamp_ns).encode(), b",", tail))


def event_kinds(env: dict[str, str] | None) -> tuple[str, ...]:
    """The kinds a bridge with environment ``env`` publishes (``EPSIGNAL_EVENT_KINDS``;
    unset: every kind)."""
    from bridge.events import KINDS

    text = (env or {}).get("EPSIGNAL_EVENT_KINDS")
    if text is None:
        return KINDS
    return tuple(k.strip() for k in text.split(",") if k.strip())


def events_per_frame(kinds) -> int:
    """Events the bridge publishes per frame of the cycle with ``kinds`` on (0, 1 or 2)."""
    return sum(1 for k in FRAME_KINDS if k in kinds)


def stamp_of(data: bytes, marker: bytes = STAMP) -> int | None:
    """The stamp in a frame or an event body (None: none there). A space after the colon is
    allowed (stdlib ``json.dumps`` writes one)."""
    i = data.find(marker)
    if i < 0:
        return None
    i += len(marker)
    n = len(data)
    while i < n and data[i] == 32:
        i += 1
    j = i
    while j < n and 48 <= data[j] <= 57:
        j += 1
    return int(data[i:j]) if j > i else None


def sample_frames(devices: int = 10, calls: int = 20) -> list[bytes]:
    """Frames without stamps, as a PBX would send them: ``calls`` whole cycles per device,
    the devices interleaved (for the codec benchmark)."""
    makers = [FrameMaker(hw_id(i), i) for i in range(devices)]
    n = calls * len(makers[0].steps)
    return [mk.next(None) for _ in range(n) for mk in makers]
