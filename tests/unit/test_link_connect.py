"""A stop while the broker link connects leaves no task behind with an exception nobody
retrieved (no broker needed: a TCP server that resets every connection stands in for it)."""

from __future__ import annotations

import asyncio
import gc
import logging

from bridge.amqp.link import BrokerLink
from bridge.config import Settings


async def test_a_stop_while_connecting_leaves_no_task_exception_unretrieved(caplog):
    """Regression: in CI an unrelated later test failed inside ``ast.parse`` ("AST constructor
    recursion depth mismatch") while the garbage collector reported "Task exception was never
    retrieved" for the aiormq connect of an earlier test's bridge, stopped while its broker reset
    the connections (:func:`bridge.amqp.link.connect` says why). The broker here resets each
    connection after the AMQP header; the stop (close, then cancel, as ``Bridge.stop``) comes
    at each loop turn after the reset in turn, so one of them lands while the connect fails."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    reset = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)  # the AMQP protocol header
        writer.transport.abort()
        reset.set()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    url = f"amqp://guest:guest@127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        for turns in range(40):
            reset.clear()
            link = BrokerLink(Settings.from_env({}, amqp_url=url, reconnect_min_s=0.1, reconnect_max_s=1.0))
            task = asyncio.create_task(link.run())
            await asyncio.wait_for(reset.wait(), 10)
            for _ in range(turns):
                await asyncio.sleep(0)
            await link.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        server.close()
        await server.wait_closed()
    gc.collect()  # what nobody refers to any more is finalized now, inside this test
    unretrieved = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not unretrieved, unretrieved[0]
