"""The sans-I/O half of the leases: ranking, the member set, the plan (bridge.leases)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from bridge.leases import (
    MISSED_HEARTBEATS, PRESENCE_DECODER, PRESENCE_ENCODER, LeasePlan, Membership, Presence, rank,
)

DEVICES = [f"0090334{i:05d}" for i in range(1, 3001)]
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)


@given(st.lists(names, min_size=1, max_size=8, unique=True), names)
def test_rank_is_the_same_whatever_the_order_of_the_members(members, hw):
    assert rank(hw, members) == rank(hw, list(reversed(members))) == rank(hw, sorted(members))


@given(st.lists(names, min_size=2, max_size=8, unique=True), names)
def test_a_member_leaving_moves_only_its_own_devices(members, hw):
    """Rendezvous hashing: without member m, the order of the others is unchanged, so a device
    m did not hold keeps its holder, and m's devices go to their stand-in."""
    gone = members[0]
    before = rank(hw, members)
    after = rank(hw, members[1:])
    assert after == [m for m in before if m != gone]


def test_ranking_spreads_devices_evenly_and_a_newcomer_takes_about_its_share():
    three = ["replica-a", "replica-b", "replica-c"]
    first = {hw: rank(hw, three)[0] for hw in DEVICES}
    counts = Counter(first.values())
    assert all(abs(n - 1000) < 100 for n in counts.values()), counts
    four = [*three, "replica-d"]
    moved = {hw for hw in DEVICES if rank(hw, four)[0] != first[hw]}
    assert all(rank(hw, four)[0] == "replica-d" for hw in moved), "a device moved between old members"
    assert abs(len(moved) - 750) < 100


def test_membership_learns_forgets_and_times_out():
    m = Membership("me", heartbeat_s=1.0, now=0.0)
    assert m.live == ("me",)
    assert m.heard(Presence(instance="b"), 1.0) is True
    assert m.heard(Presence(instance="b"), 1.5) is False  # known: no change
    assert m.heard(Presence(instance="me"), 1.5) is False  # our own heartbeat
    assert m.heard(Presence(instance="a"), 2.0) is True
    assert m.live == ("a", "b", "me") and m.changed_at == 2.0
    assert m.expire(1.5 + MISSED_HEARTBEATS - 0.1) == []
    assert m.heard(Presence(instance="a"), 6.0) is False
    assert m.expire(1.5 + MISSED_HEARTBEATS + 0.1) == ["b"]
    assert m.live == ("a", "me")
    assert m.heard(Presence(instance="a", bye=True), 7.0) is True  # goodbye: gone at once
    assert m.live == ("me",) and m.changed_at == 7.0


def test_plan_stands_in_line_for_the_first_two_and_hands_on_only_idle_settled_devices():
    m = Membership("b", heartbeat_s=1.0, now=0.0)
    plan = LeasePlan(m, heartbeat_s=1.0)
    assert all(plan.ranking(hw) == ["b"] for hw in DEVICES[:50])  # alone: everything
    m.heard(Presence(instance="a"), 0.0)
    m.heard(Presence(instance="c"), 0.0)
    mine = [hw for hw in DEVICES if plan.preferred(hw) == "b"]
    other = [hw for hw in DEVICES if plan.preferred(hw) != "b"]
    assert all(plan.ranking(hw) == rank(hw, ["a", "b", "c"])[:2] for hw in DEVICES[:100])
    hw = other[0]
    assert not plan.hand_on(hw, idle=True, now=plan.settle_s - 0.1), "member set not settled yet"
    assert not plan.hand_on(hw, idle=True, now=plan.settle_s), "its heartbeat is stale (3 beats)"
    for who in ("a", "c"):
        m.heard(Presence(instance=who), plan.settle_s - 0.5)
    assert plan.hand_on(hw, idle=True, now=plan.settle_s)
    assert not plan.hand_on(hw, idle=False, now=plan.settle_s), "a call in progress never moves"
    assert not plan.hand_on(mine[0], idle=True, now=plan.settle_s), "preferred here: kept"
    assert not plan.hand_on(hw, idle=True, now=plan.settle_s + 2.1), "never to a replica unheard for 2 beats"


def test_presence_round_trips_and_omits_defaults():
    p = Presence(instance="x", held=3, dynamic=["a b"], hello=True)
    raw = PRESENCE_ENCODER.encode(p)
    assert PRESENCE_DECODER.decode(raw) == p
    assert b"bye" not in raw
