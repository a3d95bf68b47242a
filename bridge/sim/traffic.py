"""Random call traffic: Poisson arrivals over the registered devices, with a realistic mix.

About 35% incoming answered, 25% outgoing answered, 10% busy, 10% not answered, 10% with hold
and retrieve, 10% transferred; connected times spread uniformly over 0.5..1.5 x
``call_duration_s``. A device that already has a call is skipped when another can be found.
"""

from __future__ import annotations

import asyncio
import random
from typing import Literal, Protocol

from bridge.sim.calls import Scenario
from bridge.sim.config import SimConfig
from bridge.sim.devices import Device

#: (weight, kind) of the mix
MIX = ((35, "in"), (25, "out"), (10, "busy"), (10, "noanswer"), (10, "hold"), (10, "transfer"))
_KINDS = [k for _, k in MIX]
_WEIGHTS = [w for w, _ in MIX]
#: a random pick that lands on a busy device is retried this often before the arrival is dropped
PICKS = 4
DIRECTIONS: tuple[Literal["in", "out"], ...] = ("in", "out")


class Exchange(Protocol):
    """What random traffic needs of the simulator (:class:`bridge.sim.pbx.PbxSimulator`)."""

    config: SimConfig
    rng: random.Random

    def random_registered(self) -> Device | None: ...

    def start_call(self, d: Device, sc: Scenario) -> int: ...


def random_scenario(rng: random.Random, duration_s: float) -> Scenario:
    kind = rng.choices(_KINDS, _WEIGHTS)[0]
    direction: Literal["in", "out"] = "in" if kind == "in" else "out" if kind == "out" else rng.choice(DIRECTIONS)
    return Scenario(
        direction=direction,
        remote=str(rng.randint(200, 299)),
        answer=kind != "noanswer",
        busy=kind == "busy",
        hold=kind == "hold",
        transfer_to=str(rng.randint(200, 299)) if kind == "transfer" else None,
        hold_s=rng.uniform(0.5, 1.5) * duration_s,
        hangup=rng.choice(("remote", "device")),
    )


async def random_traffic(pbx: Exchange) -> None:
    """Start calls at ``config.call_rate`` per second until cancelled.

    Arrival times are computed absolutely, so a late wake-up starts every call that is due: the
    rate holds at thousands of calls per second even though each sleep overshoots a little.
    """
    cfg, rng = pbx.config, pbx.rng
    loop = asyncio.get_running_loop()
    next_at = loop.time() + rng.expovariate(cfg.call_rate)
    while True:
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        now = loop.time()
        while next_at <= now:
            next_at += rng.expovariate(cfg.call_rate)
            for _ in range(PICKS):
                d = pbx.random_registered()
                if d is None or not d.calls:
                    break
            if d is not None:
                pbx.start_call(d, random_scenario(rng, cfg.call_duration_s))
