"""Every pause the bridge makes before trying something again, in one place. Pure: no I/O.

Each policy is a named function of the attempt (or a tenacity wait object built from
:class:`~bridge.config.Settings`); the adapters only count their attempts and sleep.

- :func:`network` (PBX runner, broker link): a network fault; ``reconnect_min_s * 2**(n-1)``
  plus up to 1 s of jitter, at most ``reconnect_max_s`` (the innovaphone client's 1 s..32 s).
- :func:`login_refused` (PBX runner): ``login_retry_s`` (60 s); a refused login is never
  retried in a tight loop.
- :func:`attach_refused` (PBX runner, with leases): 0.5 s, 1 s, 2 s, ...; a new lease holder
  can be faster than the PBX at noticing the old one left.
- :func:`short_lived` (PBX runner, broker link): after the n-th connection in a row that died
  young, doubling from ``reconnect_min_s`` to ``reconnect_max_s``, times 0.5..1 (jitter).
- :func:`broker_connect` (broker link, tenacity): within a round of the broker's addresses a
  short random pause (:data:`NEXT_ADDRESS_S`), after a whole round :func:`network` by round
  number; while hurrying (a stop with events to flush) :data:`HURRY_RETRY_S`.
- :func:`broker_lost` (broker link): after a lost connection :func:`short_lived`, while
  hurrying :data:`HURRY_RETRY_S`.
- :func:`channel_reopen` (lease channel; broker link, a component's channel the broker closed
  again soon after it was opened again): 0.1 s doubling to 5 s.
- :func:`nack_pause` (event buffer): a nacked event waits from :data:`NACK_MIN_S`, doubling,
  up to :data:`NACK_MAX_S`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from tenacity import wait_exponential_jitter, wait_fixed, wait_random

if TYPE_CHECKING:
    from bridge.config import Settings

#: a tenacity wait: seconds to wait, given a retry state (of it only ``attempt_number`` is read)
Wait = Callable[[Any], float]

#: while hurrying (a stop with events to flush): the broker is tried again this often
HURRY_RETRY_S = 0.25
#: the longest pause before trying the next address of a round (random, from 0)
NEXT_ADDRESS_S = 0.25
#: a lost channel opened again on a live connection: doubles from the first to the second
CHANNEL_REOPEN_MIN_S = 0.1
CHANNEL_REOPEN_MAX_S = 5.0
#: a component's channel closed again within this long of its last reopening counts in a row
CHANNEL_STABLE_S = 10.0
#: the pause before a nacked event goes again: doubles from NACK_MIN_S up to NACK_MAX_S
NACK_MIN_S = 0.5
NACK_MAX_S = 8.0
#: the first pause before a refused Attach is tried again (then doubling)
ATTACH_REFUSED_S = 0.5


def network(s: Settings) -> Wait:
    """A network fault, by attempt number: exponential from ``reconnect_min_s`` to
    ``reconnect_max_s``, with up to 1 s of jitter."""
    return wait_exponential_jitter(multiplier=s.reconnect_min_s, max=s.reconnect_max_s)


def attempt(n: int) -> SimpleNamespace:
    """The retry state a tenacity wait object reads, for a loop that counts its own attempts."""
    return SimpleNamespace(attempt_number=n)


def login_refused(s: Settings) -> float:
    """A refused login (wrong app name or password) is tried again this much later."""
    return s.login_retry_s


def attach_refused(n: int) -> float:
    """The pause after the n-th refused Attach (n >= 1)."""
    return ATTACH_REFUSED_S * 2 ** (n - 1)


def short_lived(s: Settings, n: int) -> float:
    """Pause before reconnecting after the n-th connection in a row that died young (the
    retry loops reset after a success, so this keeps a flapping peer from a tight loop)."""
    if n == 0:
        return 0.0
    return min(s.reconnect_max_s, s.reconnect_min_s * 2 ** (n - 1)) * random.uniform(0.5, 1.0)


def broker_connect(s: Settings, addresses: int, hurry: asyncio.Event) -> Wait:
    """The broker link's wait between connection attempts (a tenacity wait): within a round of
    its ``addresses`` a short random pause, after a round :func:`network` by round number;
    while ``hurry`` is set, :data:`HURRY_RETRY_S`."""
    fixed, between, base = wait_fixed(HURRY_RETRY_S), wait_random(0, NEXT_ADDRESS_S), network(s)

    def wait(rs) -> float:
        if hurry.is_set():
            return fixed(rs)
        if rs.attempt_number % addresses:
            return between(rs)
        return base(attempt(rs.attempt_number // addresses))
    return wait


def channel_reopen(n: int) -> float:
    """Seconds before the ``n``-th try (from 1) to open a lost channel again on a connection that
    is up (the lease channel; a link component's channel closed again within
    :data:`CHANNEL_STABLE_S`, the first time at once): 0.1 s doubling to 5 s."""
    return min(CHANNEL_REOPEN_MAX_S, CHANNEL_REOPEN_MIN_S * 2 ** max(0, n - 1))


def nack_pause(attempts: int) -> float:
    """Seconds a nacked event waits after its ``attempts``-th nack."""
    return min(NACK_MAX_S, NACK_MIN_S * 2 ** max(0, attempts - 1))


def broker_lost(s: Settings, n: int, hurry: asyncio.Event) -> float:
    """The broker link's pause after its connection was lost, the n-th in a row that died
    young (:func:`short_lived`); while ``hurry`` is set, :data:`HURRY_RETRY_S`."""
    return HURRY_RETRY_S if hurry.is_set() else short_lived(s, n)
