"""The simulator's HTTP control interface (aiohttp.web).

=========================== ==================================================================
POST /devices/<hw>/calls    body: place_call's keyword arguments, all optional, e.g.
                            ``{"direction":"in","remote":"201","answer":true,"hold_s":1.0}``
                            (also ``busy``, ``hold``, ``transfer_to``, ``hangup``)
                            -> ``{"call": id}``
POST /devices/<hw>/register -> ``{"hw":..., "registered": true}``
POST /devices/<hw>/unregister -> ``{"hw":..., "registered": false}``
GET  /devices/<hw>          -> ``{"hw", "ext", "registered", "attached", "calls": [...]}``
GET  /devices/<hw>/calls/<id> -> what each end of the call received (running, or one of the
                            last CALL_HISTORY ended calls): ``{"call", "hw", "in", "app",
                            "active", "outcome", "state", "device": [sig, ...], "pbx": [sig,
                            ...], "order": [">setup", "<alert", ...]}`` (``device``: the sigs
                            the phone received, in order; ``pbx``: those the far end received;
                            ``order``: both, ``>`` to the device, ``<`` to the PBX side)
GET  /devices/<hw>/calls    -> ``{"calls": [record, ...]}`` the device's kept and running calls
POST /sessions/drop         -> ``{"dropped": n}`` (TCP abort of every application session)
POST /sessions/garbage      body ``{"count": 5}`` -> ``{"sent": n}`` (malformed frames to
                            every session)
POST /faults                body ``{"refuse_logins": true, "delay_ms": 200}`` (each optional)
                            -> the faults now in force
GET  /stats                 -> the stats dict
=========================== ==================================================================

Errors are JSON ``{"error": "..."}``: 400 for a bad body (naming the field), 404 for an unknown
device or path, 405 for a wrong method, 409 for a call on an unregistered device.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, Protocol, TypeVar

import msgspec
from aiohttp import web
from msgspec import UNSET, Meta, Struct, UnsetType

from bridge.sim.devices import Device
from bridge.sim.faults import Faults


class Controlled(Protocol):
    """What the control API drives (:class:`bridge.sim.pbx.PbxSimulator`)."""

    devices: dict[str, Device]
    faults: Faults

    async def place_call(
        self, hw: str, direction: Literal["in", "out"] = "in", remote: str = "201", answer: bool = True,
        hold_s: float = 1.0, busy: bool = False, hold: bool = False,
        transfer_to: str | None = None, hangup: Literal["remote", "device"] = "remote",
    ) -> int: ...

    def register(self, hw: str) -> None: ...

    def unregister(self, hw: str) -> None: ...

    def device_info(self, hw: str) -> dict[str, Any]: ...

    def call_records(self, hw: str) -> list[dict[str, Any]]: ...

    def call_record(self, hw: str, call_id: int) -> dict[str, Any]: ...

    async def drop_sessions(self) -> int: ...

    async def send_garbage(self, count: int) -> int: ...

    def stats(self) -> dict[str, Any]: ...


_PBX = web.AppKey[Controlled]("pbx")
S = TypeVar("S", bound=Struct)


class CallRequest(Struct, forbid_unknown_fields=True):
    direction: Literal["in", "out"] = "in"
    remote: Annotated[str, Meta(min_length=1, max_length=64)] = "201"
    answer: bool = True
    hold_s: Annotated[float, Meta(ge=0, le=86400)] = 1.0
    busy: bool = False
    hold: bool = False
    transfer_to: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    hangup: Literal["remote", "device"] = "remote"


class FaultsRequest(Struct, forbid_unknown_fields=True):
    refuse_logins: bool | UnsetType = UNSET
    delay_ms: Annotated[int, Meta(ge=0, le=60_000)] | UnsetType = UNSET


class GarbageRequest(Struct, forbid_unknown_fields=True):
    count: Annotated[int, Meta(ge=1, le=10_000)] = 1


def _json_error(text: str) -> str:
    return msgspec.json.encode({"error": text}).decode()


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


async def _body(request: web.Request, typ: type[S]) -> S:
    data = await request.read()
    if not data.strip():
        data = b"{}"
    try:
        return msgspec.json.decode(data, type=typ)
    except msgspec.ValidationError as e:
        raise web.HTTPBadRequest(
            text=_json_error(f"invalid body: {e}"), content_type="application/json") from None
    except msgspec.DecodeError as e:
        raise web.HTTPBadRequest(
            text=_json_error(f"body is not JSON: {e}"), content_type="application/json") from None


def _device(request: web.Request):
    pbx: Controlled = request.app[_PBX]
    hw = request.match_info["hw"]
    if hw not in pbx.devices:
        raise web.HTTPNotFound(text=_json_error(f"unknown device {hw!r}"),
                               content_type="application/json")
    return pbx, hw


async def place_call(request: web.Request) -> web.Response:
    pbx, hw = _device(request)
    body = await _body(request, CallRequest)
    try:
        call = await pbx.place_call(hw, **msgspec.structs.asdict(body))
    except ValueError as e:
        return _error(409, str(e))
    return web.json_response({"call": call})


async def register(request: web.Request) -> web.Response:
    pbx, hw = _device(request)
    pbx.register(hw)
    return web.json_response({"hw": hw, "registered": True})


async def unregister(request: web.Request) -> web.Response:
    pbx, hw = _device(request)
    pbx.unregister(hw)
    return web.json_response({"hw": hw, "registered": False})


async def device(request: web.Request) -> web.Response:
    pbx, hw = _device(request)
    return web.json_response(pbx.device_info(hw))


async def call_records(request: web.Request) -> web.Response:
    pbx, hw = _device(request)
    return web.json_response({"calls": pbx.call_records(hw)})


async def call_record(request: web.Request) -> web.Response:
    pbx, hw = _device(request)
    try:
        call_id = int(request.match_info["call"])
    except ValueError:
        return _error(400, f"not a call id: {request.match_info['call']!r}")
    try:
        return web.json_response(pbx.call_record(hw, call_id))
    except KeyError as e:
        return _error(404, e.args[0])


async def drop(request: web.Request) -> web.Response:
    return web.json_response({"dropped": await request.app[_PBX].drop_sessions()})


async def garbage(request: web.Request) -> web.Response:
    body = await _body(request, GarbageRequest)
    return web.json_response({"sent": await request.app[_PBX].send_garbage(body.count)})


async def faults(request: web.Request) -> web.Response:
    pbx: Controlled = request.app[_PBX]
    body = await _body(request, FaultsRequest)
    if body.refuse_logins is not UNSET:
        pbx.faults.refuse_logins = body.refuse_logins
    if body.delay_ms is not UNSET:
        pbx.faults.delay_ms = body.delay_ms
    f = pbx.faults
    return web.json_response({"refuse_logins": f.refuse_logins, "delay_ms": f.delay_ms})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[_PBX].stats())


@web.middleware
async def _json_errors(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error answer is JSON ``{"error": ...}``, also aiohttp's own 404 and 405."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.content_type == "application/json" or e.status < 400:
            raise
        return _error(e.status, f"{e.reason}: {request.method} {request.path}")


def make_app(pbx: Controlled) -> web.Application:
    app = web.Application(middlewares=[_json_errors])
    app[_PBX] = pbx
    app.router.add_post("/devices/{hw}/calls", place_call)
    app.router.add_post("/devices/{hw}/register", register)
    app.router.add_post("/devices/{hw}/unregister", unregister)
    app.router.add_get("/devices/{hw}", device)
    app.router.add_get("/devices/{hw}/calls", call_records)
    app.router.add_get("/devices/{hw}/calls/{call}", call_record)
    app.router.add_post("/sessions/drop", drop)
    app.router.add_post("/sessions/garbage", garbage)
    app.router.add_post("/faults", faults)
    app.router.add_get("/stats", stats)
    return app


async def start_control(pbx: Controlled, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve the control API; the runner (``cleanup()`` it) and the base URL."""
    runner = web.AppRunner(make_app(pbx), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]  # the port actually bound (port 0: a free one)
    h = f"[{host}]" if ":" in host else host
    return runner, f"http://{h}:{bound_port}"
