"""A simulated innovaphone PBX speaking AppWebsocket + EpSignal, for tests, demos and benchmarks.

A real WebSocket server at ``/PBX0/APPS/websocket`` (EPSIGNAL.md section 4): login with challenge
and digest, devices that register and unregister (hw ``009033400001`` ...), Attach/Attached/
Detached/Sync, calls whose every message goes through the attached application and stalls when
it is not forwarded, calls started by the application (negative ids), scripted and random call
traffic, and faults on demand. Also connects out to an application (its server mode). An HTTP
control API drives it from outside (``bridge.sim.control``); ``bridge.sim.cli`` is the command.

Usage::

    sim = PbxSimulator(SimConfig(devices=10, ring_s=0.05))
    await sim.start()              # sim.url: ws://127.0.0.1:<port>/PBX0/APPS/websocket
    call = await sim.place_call(sim.hw(1), direction="in", hold_s=0.2)
    await sim.wait_idle(5)
    await sim.stop()
"""

from bridge.sim.calls import Scenario
from bridge.sim.config import SimConfig, hw_id, hw_index
from bridge.sim.faults import Faults
from bridge.sim.pbx import PATH, PbxSimulator

__all__ = ["PATH", "Faults", "PbxSimulator", "Scenario", "SimConfig", "hw_id", "hw_index"]
