"""Fixtures of the integration tests that several files share."""

from __future__ import annotations

import pytest

from bridge.sim import hw_id

#: devices of the lease tests (simulator devices 1..N)
N = 20


@pytest.fixture
def lease_settings(sim, settings_for):
    devices = ",".join(hw_id(i) for i in range(1, N + 1))

    def make(n: int, **kw):
        kw.setdefault("devices", devices)
        kw.setdefault("leases", True)
        return settings_for(sim, lease_heartbeat_s=0.3, instance_id=f"replica-{n}", **kw)
    return make
