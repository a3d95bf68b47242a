"""Whatever an application sends, the simulator answers nothing, counts it and stays up."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.protocol.messages import AttachResult
from bridge.sim import PbxSimulator, SimConfig
from tests.sim.helpers import App

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
# objects that look like EpSignal frames but are wrong somewhere
near_misses = st.fixed_dictionaries(
    {"api": st.just("EpSignal"),
     "mt": st.sampled_from(["Signaling", "Attach", "Sync", "Nope", "AttachResult"])},
    optional={"call": json_values, "sig": json_values, "hw": json_values, "to": json_values},
)
frames = st.one_of(
    st.binary(max_size=40).map(lambda b: b.decode("latin-1").encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    near_misses.map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(frames, min_size=1, max_size=8))
async def test_any_frames_keep_the_session_up(batch):
    sim = PbxSimulator(SimConfig(devices=2))
    await sim.start()
    try:
        app = await App.logged_in(sim.url)
        for f in batch:
            await app.send_raw(f)
        res = await app.attach("000000000000", src="probe")
        # the probe's answer comes back: the session is up and nothing else was answered
        # (a well-formed Attach among the frames would have been answered first)
        while not (isinstance(res, AttachResult) and res.src == "probe"):
            res = await app.recv()
        s = sim.stats()
        assert s["sessions"] == 1
        assert s["bad_frames"] + s["bad_signaling"] + s["late_signaling"] <= len(batch)
    finally:
        await sim.stop()
