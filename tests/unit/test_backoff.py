"""The retry pauses (bridge/backoff.py): each policy's bounds, as the adapters rely on them."""

from __future__ import annotations

import asyncio

from bridge import backoff
from bridge.config import Settings


def settings(**kw) -> Settings:
    return Settings(**{"reconnect_min_s": 1.0, "reconnect_max_s": 32.0, "login_retry_s": 60.0, **kw})


def test_network_doubles_from_the_minimum_with_up_to_a_second_of_jitter_and_stops_at_the_maximum():
    wait = backoff.network(settings())
    for n in range(1, 12):
        low = min(32.0, 2.0 ** (n - 1))
        for _ in range(20):
            assert low <= wait(backoff.attempt(n)) <= min(32.0, low + 1.0)


def test_a_refused_login_waits_login_retry_s_and_a_refused_attach_doubles_from_half_a_second():
    assert backoff.login_refused(settings(login_retry_s=60.0)) == 60.0
    assert [backoff.attach_refused(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]


def test_short_lived_connections_pause_nothing_first_then_double_with_jitter_up_to_the_maximum():
    s = settings()
    assert backoff.short_lived(s, 0) == 0.0
    for n in range(1, 10):
        full = min(32.0, 2.0 ** (n - 1))
        for _ in range(20):
            assert full / 2 <= backoff.short_lived(s, n) <= full


async def test_broker_connect_pauses_briefly_within_a_round_backs_off_after_it_and_hurries_on_request():
    hurry = asyncio.Event()
    wait = backoff.broker_connect(settings(), 3, hurry)
    for n in (1, 2, 4, 5):  # the next address of the round
        assert 0 <= wait(backoff.attempt(n)) <= backoff.NEXT_ADDRESS_S
    assert 1.0 <= wait(backoff.attempt(3)) <= 2.0  # a whole round failed: round 1 of the network policy
    assert 2.0 <= wait(backoff.attempt(6)) <= 3.0
    assert backoff.broker_lost(settings(), 0, hurry) == 0.0
    hurry.set()
    assert wait(backoff.attempt(3)) == backoff.broker_lost(settings(), 5, hurry) == backoff.HURRY_RETRY_S


def test_a_nacked_event_waits_half_a_second_doubling_up_to_eight():
    assert [backoff.nack_pause(n) for n in (0, 1, 2, 3, 4, 5, 6)] == [0.5, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


def test_a_lost_lease_channel_is_opened_again_after_a_tenth_doubling_up_to_five_seconds():
    assert [backoff.channel_reopen(n) for n in range(1, 9)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
