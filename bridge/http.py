"""HTTP for operators: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics`` (Prometheus).

- ``/healthz`` answers 200 as long as the event loop runs: it never depends on the broker or
  the PBX (a restart would not fix those).
- ``/leases`` (with leases): what this replica knows of each device's lease: its state here
  (holding, in line, ...), the wanted state, since when and by whom (JSON; docs/SCALING.md);
  404 with leases off.
- ``/readyz`` answers 200 when the broker link is up and the PBX is reachable (client mode: at
  least one PBX session is up, or no device is wanted; server mode: listening), 503 otherwise,
  with the reasons in the JSON body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bridge import metrics

if TYPE_CHECKING:
    from bridge.service import Bridge


class HttpServer:
    def __init__(self, bridge: Bridge, host: str, port: int) -> None:
        self.bridge = bridge
        self.host, self.port = host, port
        self.registry = metrics.registry_for(bridge)
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/leases", self.leases)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        reasons = self.bridge.not_ready_reasons()
        return _json({"status": "ready" if not reasons else "not ready", "reasons": reasons},
                     status=200 if not reasons else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


    async def leases(self, request: web.Request) -> web.Response:
        lm = self.bridge.leases
        if lm is None:
            return _json({"error": "leases are off (EPSIGNAL_LEASES=false)"}, status=404)
        return _json(lm.view())


def _json(obj, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json")
