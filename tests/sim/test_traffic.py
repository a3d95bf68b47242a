"""Random traffic."""

from __future__ import annotations

import random
from collections import Counter

from bridge.protocol.messages import Attach
from bridge.sim.traffic import random_scenario
from tests.sim.helpers import App, eventually


def test_random_mix_is_realistic():
    rng = random.Random(7)
    scs = [random_scenario(rng, 2.0) for _ in range(5000)]
    kinds = Counter(
        "busy" if s.busy else "noanswer" if not s.answer else "hold" if s.hold
        else "transfer" if s.transfer_to else s.direction for s in scs)
    share = {k: v / len(scs) for k, v in kinds.items()}
    assert abs(share["in"] - 0.35) < 0.03 and abs(share["out"] - 0.25) < 0.03
    for k in ("busy", "noanswer", "hold", "transfer"):
        assert abs(share[k] - 0.10) < 0.02
    assert all(1.0 <= s.hold_s <= 3.0 for s in scs)


async def test_random_traffic_through_a_forwarding_app(make_sim):
    sim = await make_sim(devices=10, call_rate=100, call_duration_s=0.02, ring_s=0.005, seed=1)
    app = await App.logged_in(sim.url)
    fwd = app.forwarding()  # forwards every Signaling; AttachResult/Attached/Sync pass by
    for i in range(1, 11):
        await app.send(Attach(hw=sim.hw(i), src=str(i)))
    await eventually(lambda: sim.stats()["attached_devices"] == 10)
    await eventually(lambda: sim.stats()["calls_completed"] >= 20, timeout=5)
    fwd.cancel()
    s = sim.stats()
    assert s["calls_stalled"] == 0 and s["bad_signaling"] == 0
    assert s["messages_forwarded"] > 40
    assert {m.src for m in app.sigs} <= {str(i) for i in range(1, 11)}
