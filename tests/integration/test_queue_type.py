"""Issue 15: the queues the bridge owns are quorum queues (EPSIGNAL_QUEUE_TYPE), on the real broker.

- A queue of the other type in the way (a classic queue from an older bridge): the broker refuses
  the declare (PRECONDITION_FAILED); the bridge logs one ERROR naming the queue, its type, the
  wanted type and what to do, readiness says it, no traceback; once the queue is deleted the
  bridge declares it by itself.
- RabbitMQ 4's delivery limit (20 by default) must never dead-letter a lease token that was given
  back again and again (lost channels, hand-ons). On a node of the test's own a policy sets the
  limit to 3 (3.10 knows the policy; 4.x has the default): the tokens survive 6 lost channels,
  and without the renewal (``RENEW_RETURNS`` out of reach) they are dead-lettered: what the test
  guards.
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import pytest

from bridge.amqp import leases as amqp_leases
from bridge.amqp import topology
from bridge.service import Bridge
from bridge.sim import hw_id
from tests import rabbitnode
from tests.integration.test_leases import N, attached_by, held, until

pytestmark = [pytest.mark.asyncio, pytest.mark.broker]


@pytest.fixture(scope="module")
def node():
    """One node of the module's own for its tests (one start instead of two): each test's
    queues, and the policy of the second, are named after that test's own names."""
    n = rabbitnode.RabbitNode().start()
    try:
        yield n
    finally:
        n.stop()


@pytest.mark.skipif(not rabbitnode.available(), reason="no rabbitmq-server on this machine")
async def test_a_queue_of_the_other_type_is_one_clear_error_and_its_deletion_the_fix(node, settings_for, caplog):
    conn = await aio_pika.connect(node.url)
    try:
        for existing, wanted in (("classic", "quorum"), ("quorum", "classic")):
            caplog.clear()
            s = settings_for(amqp_url=node.url, queue_type=wanted)  # queues of this round's own
            s = settings_for(amqp_url=node.url, queue_type=wanted, commands_queue=f"{s.commands_queue}.{wanted}",
                             dead_queue=f"{s.dead_queue}.{wanted}")
            await _mismatch_then_fix(node, conn, s, existing, wanted, caplog)
    finally:
        await conn.close()


async def _mismatch_then_fix(node, conn, s, existing: str, wanted: str, caplog) -> None:
    ch = await conn.channel()
    await ch.declare_queue(s.commands_queue, durable=True, arguments={  # as an older bridge did
        "x-queue-type": existing, "x-dead-letter-exchange": s.dead_exchange})
    caplog.set_level(logging.INFO)
    b = Bridge(s)
    await b.start()
    try:
        await until(lambda: b.link.last_error and "wants" in b.link.last_error, 10, "the mismatch seen")
        await asyncio.sleep(2.5)  # several retries (reconnect_max_s 1 s): still one ERROR
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        text = errors[0].getMessage()
        assert (f"queue '{s.commands_queue}' is a {existing} queue, EPSIGNAL_QUEUE_TYPE wants {wanted}: "
                f"set EPSIGNAL_QUEUE_TYPE={existing} to keep it, or migrate") in text
        assert "guest:guest" not in text
        assert not any(r.exc_info for r in caplog.records), "a traceback in the log"
        reasons = b.not_ready_reasons()
        assert any(f"is a {existing} queue, EPSIGNAL_QUEUE_TYPE wants {wanted}" in r for r in reasons), reasons
        assert not b.link.ready
        # the documented fix: delete the queue; the bridge declares it again by itself
        await ch.queue_delete(s.commands_queue)
        assert await b.link.wait_ready(10), "the bridge did not connect once the queue was gone"
        assert not [r for r in b.not_ready_reasons() if r.startswith("broker")]
        types = dict(line.split() for line in node.ctl("list_queues", "-q", "--no-table-headers", "name",
                                                       "type").splitlines() if len(line.split()) == 2)
        assert types[s.commands_queue] == wanted and types[s.dead_queue] == wanted
    finally:
        await b.stop(2)
        await ch.close()


async def _lease_channel_errors(b: Bridge, n: int, all_back: bool = True) -> None:
    """Close b's lease channel ``n`` times (an unknown delivery tag: PRECONDITION_FAILED): every
    token goes back to its queue (counted), and comes back to b, its only consumer."""
    for i in range(n):
        await until(lambda: b.leases._usable() is not None, 10, "a lease channel")
        lost = b.leases.channels_lost
        await b.leases._usable().basic_nack(999_999, requeue=True)
        await until(lambda lost=lost: b.leases.channels_lost == lost + 1, 5, "the lease channel loss noticed")
        if all_back:
            await until(lambda: held([b]) == [N], 10, f"the tokens back after loss {i + 1}")
        else:
            await asyncio.sleep(1.5)


async def _tokens(conn, b: Bridge) -> tuple[int, int]:
    """(tokens in the lease queues, ready or held; messages in the dead-letter queue)."""
    ch = await conn.channel()
    try:
        ready = 0
        for i in range(1, N + 1):
            q = await ch.declare_queue(topology.lease_queue(b.s, hw_id(i)), passive=True)
            ready += q.declaration_result.message_count
        dead = (await ch.declare_queue(b.s.dead_queue, passive=True)).declaration_result.message_count
    finally:
        await ch.close()
    return ready + len(b.leases.tokens), dead


@pytest.mark.skipif(not rabbitnode.available(), reason="no rabbitmq-server on this machine")
async def test_a_lease_token_given_back_again_and_again_is_never_dead_lettered(node, sim, lease_settings,
                                                                             monkeypatch):
    b = None
    try:
        s = lease_settings(1, amqp_url=node.url)
        node.ctl("set_policy", "limit", rf"^{s.commands_queue}\.", '{"delivery-limit": 3}', "--apply-to", "queues")
        conn = await aio_pika.connect(node.url)
        b = Bridge(s)
        await b.start()
        await until(lambda: held([b]) == [N] and len(attached_by([b])) == N, 20, "every device held and attached")
        await _lease_channel_errors(b, 6)
        assert held([b]) == [N]
        await until(lambda: len(attached_by([b])) == N, 10, "every device attached again")
        assert await _tokens(conn, b) == (N, 0), "a token lost or dead-lettered"
        await b.stop(2)

        # the same without the renewal: the delivery limit takes the tokens (what the test guards)
        monkeypatch.setattr(amqp_leases, "RENEW_RETURNS", 10**9)
        b = Bridge(lease_settings(2, amqp_url=node.url))
        await b.start()
        await until(lambda: held([b]) == [N], 20, "every device held")
        await _lease_channel_errors(b, 5, all_back=False)
        # dead-lettered (a lone replica mints a new token when it finds its queue empty and
        # unconsumed; with a stand-in consuming, the device would be left without one)
        tokens, dead = await _tokens(conn, b)
        assert dead > 0, (tokens, dead)
        await conn.close()
    finally:
        if b is not None:
            await b.stop(2)
