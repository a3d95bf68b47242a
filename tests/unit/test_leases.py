"""The sans-I/O half of the leases: ranking, the member set, the plan (bridge.leases)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from bridge.leases import (
    BOUNCE_BACKOFF_MAX, BOUNCED_PER_BEAT, MISSED_HEARTBEATS, ORPHAN_BEATS, PRESENCE_DECODER, PRESENCE_ENCODER,
    LeasePlan, Membership, Orphans, Presence, rank,
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


def test_a_hand_on_that_bounces_is_tried_again_only_after_a_doubling_pause():
    m = Membership("b", heartbeat_s=1.0, now=0.0)
    plan = LeasePlan(m, heartbeat_s=1.0)
    m.heard(Presence(instance="a"), 0.0)
    hw = next(hw for hw in DEVICES if plan.preferred(hw) == "a")
    settle = plan.settle_s

    def heard(t: float) -> None:
        m.heard(Presence(instance="a"), t)

    t = settle
    heard(t)
    assert plan.hand_on(hw, idle=True, now=t)
    assert plan.holding(hw, t) == 0, "held without a hand-on before: no bounce"
    plan.handed_on(hw, t)
    assert plan.holding(hw, t + 0.3) == 1, "the token came straight back: a bounce"
    for t2 in (t + 0.3 + 2 * settle - 0.1, t + 0.3 + 2 * settle):  # paused twice the settle time
        heard(t2)
        assert plan.hand_on(hw, idle=True, now=t2) is (t2 >= t + 0.3 + 2 * settle)
    t = t + 0.3 + 2 * settle
    plan.handed_on(hw, t)
    assert plan.holding(hw, t + 0.2) == 2 and plan.backoff_s(hw, t + 0.2) == 4 * settle, "doubled"
    for _ in range(10):  # bounce after bounce: the pause stops growing
        t += plan.backoff_s(hw, t + 0.2) + 0.2
        heard(t)
        assert plan.hand_on(hw, idle=True, now=t)
        plan.handed_on(hw, t)
        plan.holding(hw, t + 0.2)
    assert plan.backoff_s(hw, t + 0.2) == BOUNCE_BACKOFF_MAX * settle
    # a hand-on that took (the token came back only much later): the pause is forgotten
    t += plan.backoff_s(hw, t + 0.2) + 0.2
    heard(t)
    plan.handed_on(hw, t)
    assert plan.holding(hw, t + settle + 1) == 0 and plan.backoff_s(hw, t + settle + 1) == 0
    # a new member set: the pause no longer holds (the preferred replica may be another, or back)
    plan.handed_on(hw, t + 10)
    assert plan.holding(hw, t + 10.1) == 1 and plan.backoff_s(hw, t + 10.1) > 0
    m.heard(Presence(instance="c"), t + 10.2)
    assert plan.backoff_s(hw, t + 10.2) == 0


def test_a_holder_says_which_hand_ons_bounced_and_the_preferred_replica_rejoins_once_per_bounce():
    """b holds a device a is preferred for; b's hand-ons come straight back (a's consumer on the
    lease queue is lost while a lives): b's heartbeat says so, and a lines up again, once per
    bounce, never for a device it is not preferred for."""
    mb, ma = Membership("b", 1.0, 0.0), Membership("a", 1.0, 0.0)
    b, a = LeasePlan(mb, 1.0), LeasePlan(ma, 1.0)
    mb.heard(Presence(instance="a"), 0.0)
    ma.heard(Presence(instance="b"), 0.0)
    mine = next(hw for hw in DEVICES if a.preferred(hw) == "a")
    theirs = next(hw for hw in DEVICES if a.preferred(hw) == "b")
    assert b.bounced([mine, theirs]) == {}, "nothing handed on yet"
    b.handed_on(mine, 10.0)
    b.holding(mine, 10.2)
    said = PRESENCE_DECODER.decode(PRESENCE_ENCODER.encode(Presence(instance="b", bounced=b.bounced([mine]))))
    assert said.bounced == {mine: 1}
    assert a.rejoin(said) == [mine]
    assert a.rejoin(said) == [], "the same bounce heard again (every heartbeat): lined up again once"
    b.handed_on(mine, 20.0)
    b.holding(mine, 20.2)  # bounced again: the consumer made anew was lost too
    assert a.rejoin(Presence(instance="b", bounced=b.bounced([mine]))) == [mine]
    assert a.rejoin(Presence(instance="b", bounced={theirs: 3})) == [], "not preferred here: not mine to fix"
    assert b.bounced([theirs]) == {}, "only devices held here whose hand-on bounced"
    assert a.rejoin(Presence(instance="b")) == [], "the holder's streak ended (the hand-on took)"
    assert a.rejoin(Presence(instance="b", bounced={mine: 1})) == [mine], "a new streak counts anew"
    assert a.rejoin(Presence(instance="b", bounced={mine: 3})) == [mine]
    assert a.rejoin(Presence(instance="b", bounced={mine: 1})) == [mine], \
        "a streak started again while this replica missed the heartbeat without it: still new"
    ma.heard(Presence(instance="b", bye=True), 30.0)
    assert a.rejoin(Presence(instance="c")) == [] and a._rejoined == {}, "a holder gone: its bounces forgotten"


def test_a_heartbeat_names_a_bounded_share_of_the_bounced_devices_each_time():
    m = Membership("b", 1.0, 0.0)
    plan = LeasePlan(m, 1.0)
    m.heard(Presence(instance="a"), 0.0)
    mine = [hw for hw in DEVICES if plan.preferred(hw) == "a"][:BOUNCED_PER_BEAT + 50]
    for hw in mine:
        plan.handed_on(hw, 10.0)
        plan.holding(hw, 10.1)
    said: set[str] = set()
    for _ in range(2):
        beat = plan.bounced(mine)
        assert len(beat) == BOUNCED_PER_BEAT and set(beat.values()) == {1}
        said |= set(beat)
    assert said == set(mine), "every one named within two heartbeats"


def test_presence_round_trips_and_omits_defaults():
    p = Presence(instance="x", held=3, dynamic=["a b"], hello=True)
    raw = PRESENCE_ENCODER.encode(p)
    assert PRESENCE_DECODER.decode(raw) == p
    assert b"bye" not in raw


def heartbeat(orphans: Orphans, instance: str, held: set[str], **kw) -> Presence:
    held_map, held_other = orphans.announce(held)
    return PRESENCE_DECODER.decode(PRESENCE_ENCODER.encode(Presence(
        instance=instance, held=len(held), cfg=orphans.cfg, held_map=held_map, held_other=held_other, **kw)))


def test_a_heartbeat_says_which_devices_are_held_in_a_bitmap_of_the_configuration():
    m = Membership("me", heartbeat_s=1.0, now=0.0)
    big = [f"0090334{i:05d}" for i in range(1, 10_001)]
    o = Orphans(m, big, heartbeat_s=1.0)
    held = set(big[::3]) | {"adopted-1"}
    raw = PRESENCE_ENCODER.encode(heartbeat(o, "a", held))
    assert len(raw) < 2_000, "10,000 devices: 1,250 bytes of bitmap (base64 in JSON)"
    m.heard(PRESENCE_DECODER.decode(raw), 0.0)
    assert all(o.held_by("a", hw) is (hw in held) for hw in big)
    assert o.held_by("a", "adopted-1") is True and o.held_by("a", "adopted-2") is False
    assert o.held_by("b", big[0]) is None, "not heard: it does not say"
    other = Orphans(Membership("x", 1.0, 0.0), big[:-1], heartbeat_s=1.0)
    m.heard(heartbeat(other, "c", set()), 0.0)  # another configuration: its bitmap means nothing here
    assert o.held_by("c", big[1]) is None and o.held_by("c", "adopted-1") is None
    m.heard(Presence(instance="d", held=5), 0.0)  # an older version: says nothing of which
    assert o.held_by("d", big[1]) is None


def test_an_orphan_is_a_device_in_line_here_that_no_replica_has_said_it_holds_for_some_beats():
    hb = 0.5
    m = Membership("me", heartbeat_s=hb, now=0.0)
    o = Orphans(m, DEVICES[:10], heartbeat_s=hb)
    hw, busy = DEVICES[0], DEVICES[1]
    after = ORPHAN_BEATS * hb
    m.heard(heartbeat(o, "a", {hw, busy}), 0.0)
    assert not o.orphaned(hw, preferred=True, now=0.0)
    m.heard(heartbeat(o, "a", {busy}), 1.0)  # a no longer holds it (its node died with its queue's consumer)
    assert not o.orphaned(hw, preferred=True, now=1.0)
    assert not o.orphaned(hw, preferred=True, now=1.0 + after - 0.1)
    assert o.orphaned(hw, preferred=True, now=1.0 + after)
    assert not o.orphaned(busy, preferred=True, now=1.0 + after), "held by a"
    # the stand-in waits twice as long: one replica repairs, not two at once
    assert not o.orphaned(DEVICES[2], preferred=False, now=1.0)
    assert not o.orphaned(DEVICES[2], preferred=False, now=1.0 + 2 * after - 0.1)
    assert o.orphaned(DEVICES[2], preferred=False, now=1.0 + 2 * after)
    # looked at (the queue had an active consumer, or repaired): counted again from then
    o.watch(hw, 1.0 + after)
    assert not o.orphaned(hw, preferred=True, now=1.0 + 2 * after - 0.1)
    assert o.orphaned(hw, preferred=True, now=1.0 + 2 * after)
    # a heartbeat saying it is held again stops the count; not watched any more: starts anew
    m.heard(heartbeat(o, "a", {hw}), 5.0)
    assert not o.orphaned(hw, preferred=True, now=5.0)
    m.heard(heartbeat(o, "a", set()), 6.0)
    assert not o.orphaned(hw, preferred=True, now=6.0 + after - 0.1)
    o.watch(hw)
    assert not o.orphaned(hw, preferred=True, now=6.0 + after)
    # a new replica, not heard yet: nothing is an orphan until it says what it holds
    m.heard(Presence(instance="b"), 7.0)
    assert not o.orphaned(DEVICES[3], preferred=True, now=7.0)
    assert not o.orphaned(DEVICES[3], preferred=True, now=7.0 + 3 * after)
    m.heard(heartbeat(o, "b", set()), 8.0)
    assert not o.orphaned(DEVICES[3], preferred=True, now=8.0)
    assert o.orphaned(DEVICES[3], preferred=True, now=8.0 + after)
    # a replica gone (expired, or said bye) says nothing any more; alone, in line and unheld: orphan
    m.heard(Presence(instance="a", bye=True), 9.0)
    m.heard(Presence(instance="b", bye=True), 9.0)
    assert m.said == {}
    assert o.orphaned(DEVICES[4], preferred=True, now=9.0) is False
    assert o.orphaned(DEVICES[4], preferred=True, now=9.0 + after)
