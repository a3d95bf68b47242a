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

from collections.abc import Callable

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bridge import metrics


class HttpServer:
    """The operators' endpoints. It knows callables, not the bridge: ``not_ready`` (the reasons
    the bridge is not ready; empty: ready), ``snapshot`` (for the metrics) and ``leases`` (the
    lease view; None: leases are off)."""

    def __init__(self, host: str, port: int, not_ready: Callable[[], list[str]],
                 snapshot: Callable[[], metrics.Snapshot], leases: Callable[[], object | None]) -> None:
        self.host, self.port = host, port
        self.not_ready = not_ready
        self.lease_view = leases
        self.registry = metrics.registry_for(snapshot)
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
        self.port = self._runner.addresses[0][1]  # the port bound (``port`` 0: a free one)

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        reasons = self.not_ready()
        return _json({"status": "ready" if not reasons else "not ready", "reasons": reasons},
                     status=200 if not reasons else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def leases(self, request: web.Request) -> web.Response:
        view = self.lease_view()
        if view is None:
            return _json({"error": "leases are off (EPSIGNAL_LEASES=false)"}, status=404)
        return _json(view)


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json")
