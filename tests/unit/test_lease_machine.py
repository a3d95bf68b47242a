"""Issue 14: the ownership state machine (bridge.leases.Lease) proven against a model of RabbitMQ.

A Hypothesis stateful test drives several replicas' machines against an in-memory model of a
single-active-consumer queue per device, as RabbitMQ 3.10 behaves:

- messages are delivered in order, only to the first consumer in line (the active one), at
  most ``PREFETCH`` unacked per consumer;
- ``basic.cancel`` removes the consumer but keeps its unacked messages on its channel;
- closing a channel (crash, channel error, consumer timeout, a connection lost) requeues its
  unacked messages at the head of the queue, marked redelivered;
- an ack/nack of a delivery tag the channel does not know (a stale tag) is a channel error that
  closes the channel;
- deliveries and cancel-oks reach the replica later (its inbox), and runner stops end later;
- RabbitMQ 3.10.8's quorum-queue defect (docs/SCALING.md): a queue left with no active consumer,
  its consumers waiting for good, until a consumer is added (it is made active). A replica in line
  repairs such a queue (bridge.leases.Orphans: nobody holds the device, no active consumer) by
  stepping out of line; it lines up again later. A consumer waiting in line can be lost too, and a
  line-up can fail before its consumer is made (the lease queue's declare refused by a node dying).

Replicas restart (a rolling restart) with the same configuration or another one (a changed
EPSIGNAL_DEVICES); tokens carry the configuration their wanted state was made under.

After every step: the invariant holds for every replica (a runner on only in HOLDING, with a
token delivered on its current open channel, which the broker model agrees is unacked there),
and at most one replica runs each device, a runner counting as running until its stop has
ended; and THE RULE (configuration versus commands, issue 20): a holder whose own newest wish
has arrived runs the device exactly when the token it holds says "attached", or says
"detached" under another configuration. The one exception is a runner stopping because its channel
closed: the broker hands the token on at the close, before any client can stop anything (the
PBX's "already attached" refusal covers that window; docs/SCALING.md). A replica learns of its channel's close at once.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from bridge.leases import (
    TRANSITIONS, Ack, Cancel, Consume, Defer, Lease, LeaseError, Nack, Process, Publish, StartRunner,
    State, StopRunner, Wanted,
)

DEVICES = ("d1", "d2")
REPLICAS = ("r1", "r2", "r3")
CONFIGS = ("A", "B")
PREFETCH = 3
#: disruptive steps happen on one draw in four (else little gets to HOLDING)
RARE = st.integers(0, 3)


@dataclass
class Msg:
    token: bool
    gen: int = 0
    attach: bool = True
    redelivered: bool = False
    cfg: str = "A"


@dataclass
class Queue:
    ready: deque = field(default_factory=deque)
    consumers: list = field(default_factory=list)  # (replica, epoch, ctag), in consume order
    #: no active consumer: nothing is delivered until a consumer is added (made active)
    stuck: bool = False


@dataclass
class Channel:
    epoch: int
    unacked: dict = field(default_factory=dict)  # dtag -> (hw, ctag, Msg), in delivery order
    next_dtag: int = 1
    declared: set = field(default_factory=set)


@dataclass
class Replica:
    name: str
    cfg: str = "A"
    ch: Channel | None = None
    leases: dict = field(default_factory=dict)
    inbox: deque = field(default_factory=deque)
    stops: list = field(default_factory=list)       # (hw, seq) still stopping
    deferred: list = field(default_factory=list)    # (hw, epoch, ctag, dtag)
    wished: dict = field(default_factory=dict)      # hw -> the last token published (this channel)
    consuming: list = field(default_factory=list)   # Consume actions on their way (declare, then consume)

    def lease(self, hw: str) -> Lease:
        return self.leases.setdefault(hw, Lease(hw, cfg=self.cfg))


class LeaseModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.queues = {hw: Queue() for hw in DEVICES}
        self.replicas = {r: Replica(r) for r in REPLICAS}
        self.epochs = itertools.count(1)
        self.ctags = itertools.count(1)
        self.channel_errors = 0
        self._losing = False

    @initialize()
    def every_replica_connected_and_in_line(self):
        for r in self.replicas.values():
            r.ch = Channel(next(self.epochs))
            for hw in DEVICES:
                self._run(r, r.lease(hw).line_up(r.ch.epoch, f"c{next(self.ctags)}"))
            while r.consuming:
                self._make_consumer(r, r.consuming.pop(0))

    # ------------------------------------------------------------------ the broker model
    def _close(self, r: Replica) -> None:
        ch, r.ch = r.ch, None
        if ch is None:
            return
        for q in self.queues.values():
            q.consumers = [c for c in q.consumers if c[1] != ch.epoch]
        for hw, _ctag, msg in reversed(list(ch.unacked.values())):  # back at the head, in order
            msg.redelivered = True
            self.queues[hw].ready.appendleft(msg)
        # the broker hands the tokens on at the close: runners still stopping (for whatever
        # reason) and the ones stopped now are in the unavoidable window
        r.stops = [(hw, seq, True) for hw, seq, _lost in r.stops]
        r.wished.clear()
        self._losing = True
        try:
            for lease in list(r.leases.values()):
                self._run(r, lease.channel_lost(ch.epoch))
        finally:
            self._losing = False

    def _settle_tag(self, r: Replica, epoch: int, dtag: int) -> tuple | None:
        ch = r.ch
        if ch is None or ch.epoch != epoch:
            return None  # the I/O side drops acks for a channel that is gone
        entry = ch.unacked.pop(dtag, None)
        if entry is None:  # PRECONDITION_FAILED - unknown delivery tag: the channel closes
            self.channel_errors += 1
            self._close(r)
        return entry

    def _make_consumer(self, r: Replica, a: Consume) -> None:
        """A line-up's declare (a token minted for a queue with nothing ready and no consumer),
        then its consumer, unless the lease gave that line-up up meanwhile
        (bridge.amqp.leases._consume checks after its awaits: a consumer made then would be a
        stray the lease does not know)."""
        ch = r.ch
        if ch is None or ch.epoch != a.epoch:
            return
        q = self.queues[a.hw]
        if a.hw not in ch.declared:
            ch.declared.add(a.hw)
            if not q.ready and not q.consumers:  # the minting rule of bridge.amqp.leases
                q.ready.append(Msg(token=True, cfg=r.cfg))
        lease = r.lease(a.hw)
        if lease.state is not State.IN_LINE or lease.ctag != a.ctag:
            return
        if q.stuck:  # a consumer added to a queue without an active one is made active
            q.stuck = False
            q.consumers.insert(0, (r.name, a.epoch, a.ctag))
        else:
            q.consumers.append((r.name, a.epoch, a.ctag))

    def _run(self, r: Replica, actions) -> None:
        for a in actions:
            if isinstance(a, Consume):
                r.consuming.append(a)  # on its way: the declare (and the first token) come first
            elif isinstance(a, Cancel):
                if r.ch is not None and r.ch.epoch == a.epoch:
                    q = self.queues[a.hw]
                    q.consumers = [c for c in q.consumers if c[2] != a.ctag]
                    r.inbox.append(("cancel_ok", a.hw, a.epoch, a.ctag))
            elif isinstance(a, Ack):
                self._settle_tag(r, a.epoch, a.dtag)
            elif isinstance(a, Nack):
                entry = self._settle_tag(r, a.epoch, a.dtag)
                if entry is not None:
                    entry[2].redelivered = True
                    self.queues[entry[0]].ready.appendleft(entry[2])
            elif isinstance(a, Publish):
                if r.ch is not None:
                    self.queues[a.hw].ready.append(Msg(token=True, gen=a.gen, attach=a.attach, cfg=a.cfg))
                    r.wished[a.hw] = a
            elif isinstance(a, StartRunner):
                pass  # the runner is lease.runner; checked by the invariants
            elif isinstance(a, StopRunner):
                r.stops.append((a.hw, a.seq, self._losing))
            elif isinstance(a, Process):
                lease = r.leases[a.hw]
                self._settle_tag(r, lease.epoch, a.dtag)
            elif isinstance(a, Wanted):
                pass  # said (log, event) by the I/O side
            elif isinstance(a, Defer):
                r.deferred.append((a.hw, r.leases[a.hw].epoch, r.leases[a.hw].ctag, a.dtag))
            else:  # pragma: no cover
                raise AssertionError(a)

    # ------------------------------------------------------------------ broker steps
    @rule(hw=st.sampled_from(DEVICES))
    def deliver(self, hw):
        q = self.queues[hw]
        if not q.consumers or not q.ready or q.stuck:
            return
        name, epoch, ctag = q.consumers[0]  # single active consumer: the first in line
        r = self.replicas[name]
        ch = r.ch
        if sum(1 for _h, c, _m in ch.unacked.values() if c == ctag) >= PREFETCH:
            return
        msg = q.ready.popleft()
        dtag = ch.next_dtag
        ch.next_dtag += 1
        ch.unacked[dtag] = (hw, ctag, msg)
        r.inbox.append(("deliver", hw, epoch, ctag, dtag, msg))

    @rule(hw=st.sampled_from(DEVICES))
    def a_command_arrives(self, hw):
        self.queues[hw].ready.append(Msg(token=False))

    @rule(hw=st.sampled_from(DEVICES), cfg=st.sampled_from(CONFIGS), attach=st.booleans(),
          gen=st.integers(0, 3))
    def an_extra_token(self, hw, cfg, attach, gen):
        """A token minted by a race (two replicas declaring an empty queue at once), or left
        from an earlier time (a detach under configuration A or B)."""
        self.queues[hw].ready.append(Msg(token=True, cfg=cfg, attach=attach, gen=gen))

    @rule(hw=st.sampled_from(DEVICES), rare=RARE)
    def the_queue_is_left_without_an_active_consumer(self, hw, rare):
        """RabbitMQ 3.10.8 after its consumers' node died (docs/SCALING.md): the consumer that was
        active is gone, its deliveries back in the queue, and no waiting consumer is made active.
        Only then: while a live channel holds a delivery of the queue its consumer is active, and
        a single-active-consumer queue never makes another one active beside it (marking such a
        queue stuck let the model hand the device to a second replica, a broker that does not
        exist)."""
        if rare:
            return
        delivered = any(h == hw for r in self.replicas.values() if r.ch is not None
                        for h, _c, _m in r.ch.unacked.values())
        if not delivered:
            self.queues[hw].stuck = True

    @rule(hw=st.sampled_from(DEVICES), i=st.integers(1, 2), rare=RARE)
    def a_waiting_consumer_is_lost(self, hw, i, rare):
        """A consumer waiting in line gone from the queue while its replica lives and thinks it
        in line (seen after a node kill on RabbitMQ 3.10.8: a holder's hand-on to that replica
        then comes straight back; the replica steps out of line when it hears so, the release
        rule here)."""
        q = self.queues[hw]
        if not rare and len(q.consumers) > i:
            del q.consumers[i]

    @rule(name=st.sampled_from(REPLICAS), fails=st.integers(0, 3))
    def a_line_up_goes_on(self, name, fails):
        """The replica's oldest line-up on its way: its declare done and its consumer made, or
        (one in four) its declare or first token failed: no consumer made, no token minted
        (bridge.amqp.leases._consume feeds consume_failed back)."""
        r = self.replicas[name]
        if not r.consuming:
            return
        a = r.consuming.pop(0)
        if fails:
            self._make_consumer(r, a)
        else:
            self._run(r, r.lease(a.hw).consume_failed(a.epoch, a.ctag))

    @rule(name=st.sampled_from(REPLICAS), rare=RARE)
    def channel_closed(self, name, rare):
        """A channel error, the consumer timeout, a lost connection: unacked messages requeued."""
        if rare:
            return
        self._close(self.replicas[name])

    @rule(name=st.sampled_from(REPLICAS), rare=RARE)
    def crash(self, name, rare):
        """SIGKILL: the channel closes and the replica's runners die with it."""
        if rare:
            return
        r = self.replicas[name]
        self._close(r)
        self.replicas[name] = Replica(name, r.cfg)

    @rule(name=st.sampled_from(REPLICAS), cfg=st.sampled_from(CONFIGS), rare=RARE)
    def restart(self, name, cfg, rare):
        """A rolling restart (a graceful stop: the channel closes), with the same configuration
        or a new EPSIGNAL_DEVICES."""
        if rare:
            return
        self._close(self.replicas[name])
        self.replicas[name] = Replica(name, cfg)
    @rule(name=st.sampled_from(REPLICAS))
    def reconnect(self, name):
        r = self.replicas[name]
        if r.ch is None:
            r.ch = Channel(next(self.epochs))

    # ------------------------------------------------------------------ replica steps
    @rule(name=st.sampled_from(REPLICAS), n=st.integers(1, 3))
    def replica_reads(self, name, n):
        for _ in range(n):
            self._read(self.replicas[name])

    def _read(self, r: Replica) -> None:
        if not r.inbox:
            return
        item = r.inbox.popleft()
        if item[0] == "deliver":
            _, hw, epoch, ctag, dtag, msg = item
            lease = r.lease(hw)
            if msg.token:
                acts = lease.token_delivered(epoch, ctag, dtag, msg.gen, msg.attach, msg.redelivered,
                                             cfg=msg.cfg)
            else:
                acts = lease.command(epoch, ctag, dtag)
        else:
            _, hw, epoch, ctag = item
            acts = r.lease(hw).cancel_ok(epoch, ctag)
        self._run(r, acts)

    @rule(name=st.sampled_from(REPLICAS), hw=st.sampled_from(DEVICES))
    def line_up(self, name, hw):
        r = self.replicas[name]
        lease = r.lease(hw)
        if r.ch is not None and lease.state is State.OUT:
            self._run(r, lease.line_up(r.ch.epoch, f"c{next(self.ctags)}"))

    def _holder(self, hw: str) -> Replica | None:
        for r in self.replicas.values():
            if r.lease(hw).state is State.HOLDING:
                return r
        return None

    @rule(name=st.sampled_from(REPLICAS), hw=st.sampled_from(DEVICES), holder=st.booleans())
    def release(self, name, hw, holder):
        """The plan: hand on (the holder) or step out of line (anyone)."""
        r = self._holder(hw) if holder else self.replicas[name]
        if r is not None and r.lease(hw).state in (State.IN_LINE, State.HOLDING):
            self._run(r, r.lease(hw).release())

    @rule(name=st.sampled_from(REPLICAS), hw=st.sampled_from(DEVICES))
    def an_orphan_is_repaired(self, name, hw):
        """bridge.amqp.leases._repair: in line here, nobody holds the device, and its queue has
        messages ready and no active consumer: step out of line (the plan lines up again)."""
        r = self.replicas[name]
        q = self.queues[hw]
        if (r.lease(hw).state is State.IN_LINE and self._holder(hw) is None and q.ready
                and (q.stuck or not q.consumers)):
            self._run(r, r.lease(hw).release())

    @rule(hw=st.sampled_from(DEVICES), attach=st.booleans())
    def want(self, hw, attach):
        """An attach or detach command carried out by the holder."""
        r = self._holder(hw)
        if r is not None:
            self._run(r, r.lease(hw).want(attach))

    @rule(hw=st.sampled_from(DEVICES))
    def renew(self, hw):
        r = self._holder(hw)
        if r is not None:
            self._run(r, r.lease(hw).renew())

    @rule(name=st.sampled_from(REPLICAS), i=st.integers(0, 5))
    def a_runner_stops(self, name, i):
        r = self.replicas[name]
        if r.stops:
            hw, seq, _lost = r.stops.pop(i % len(r.stops))
            self._run(r, r.lease(hw).runner_stopped(seq))

    @rule(name=st.sampled_from(REPLICAS))
    def a_deferred_command_is_offered_again(self, name):
        r = self.replicas[name]
        if r.deferred:
            hw, epoch, ctag, dtag = r.deferred.pop(0)
            self._run(r, r.lease(hw).command(epoch, ctag, dtag, retry=True))

    # ------------------------------------------------------------------ the invariant
    @invariant()
    def every_consumer_is_one_its_replica_s_lease_knows(self):
        """No stray consumer: one the lease does not know would be given the token and give it
        back, again and again, while the device waits."""
        for hw, q in self.queues.items():
            for name, epoch, ctag in q.consumers:
                lease = self.replicas[name].leases.get(hw)
                assert lease is not None and (lease.epoch, lease.ctag) == (epoch, ctag), \
                    f"a consumer {ctag} of {name} on {hw} that its lease ({lease}) does not know"

    @invariant()
    def exactly_one_runner_and_only_under_a_held_token(self):
        for hw in DEVICES:
            running = []
            for r in self.replicas.values():
                lease = r.leases.get(hw)
                if lease is None:
                    continue
                lease.check(open_epoch=r.ch.epoch if r.ch is not None else None)
                if lease.runner:
                    assert r.ch is not None, f"{r.name} runs {hw} without an open lease channel"
                    tok = lease.token
                    entry = r.ch.unacked.get(tok.dtag)
                    assert entry is not None and entry[0] == hw and entry[2].token, \
                        f"{r.name} runs {hw} on a token the broker does not see it hold"
                    assert (hw, lease.epoch, lease.ctag) and any(
                        c[0] == r.name and c[2] == lease.ctag for c in self.queues[hw].consumers), \
                        f"{r.name} runs {hw} without its consumer in line"
                    running.append(r.name)
                elif any(h == hw and not lost for h, _seq, lost in r.stops):
                    # still stopping: a runner runs until its stop ends (a release waits for it)
                    running.append(r.name + " (stopping)")
            assert len(running) <= 1, f"{hw} run by {running}"

    @invariant()
    def the_runner_follows_the_rule(self):
        """THE RULE, from the token the broker sees held (not the machine's reading of it)."""
        for r in self.replicas.values():
            for hw, lease in r.leases.items():
                if lease.state is not State.HOLDING or r.ch is None:
                    continue
                held = r.ch.unacked[lease.token.dtag][2]
                wish = r.wished.get(hw)
                if wish is not None and held.gen < wish.gen:
                    # its newest wish is on its way: an older token held meanwhile never undoes it
                    assert lease.runner == (wish.attach or wish.cfg != r.cfg), (
                        f"{r.name} runs {hw}: {lease.runner}, against its wish {wish} (holding {held})")
                    continue
                if lease.pending is not None:
                    continue
                wanted = held.attach or held.cfg != r.cfg
                assert lease.runner == wanted, (
                    f"{r.name} (configuration {r.cfg}) holds {hw} under {held}: runner {lease.runner}")


TestLeaseModel = LeaseModel.TestCase
TestLeaseModel.settings = settings(max_examples=int(os.environ.get("LEASE_MODEL_EXAMPLES", "1500")),
                                   stateful_step_count=80, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


def test_every_state_has_a_way_out_and_illegal_events_raise():
    assert set(TRANSITIONS) == set(State)
    lease = Lease("d")
    with pytest.raises(LeaseError):
        lease.release()  # OUT: nothing to release
    lease.line_up(1, "c1")
    with pytest.raises(LeaseError):
        lease.want(True)  # not holding: a command must not start a runner
    acts = lease.token_delivered(1, "c1", 1, 0, True)
    assert acts == [StartRunner("d")] and lease.holding and lease.runner
    with pytest.raises(LeaseError):
        lease.line_up(1, "c2")


def test_a_line_up_that_fails_before_its_consumer_is_made_is_out_and_lines_up_again():
    """Left IN_LINE after its lease queue's declare or first token failed (a node dying), a
    replica would wait for good for a token that cannot come; a holder's hand-on to it would come
    straight back. It is OUT instead; a late failure of a line-up given up meanwhile is ignored."""
    lease = Lease("d")
    assert lease.line_up(1, "c1") == [Consume("d", 1, "c1")]
    assert lease.consume_failed(1, "c1") == [] and lease.state is State.OUT
    lease.line_up(1, "c2")
    assert lease.consume_failed(1, "c1") == [] and lease.state is State.IN_LINE, "another consumer's"
    lease.channel_lost(1)
    lease.line_up(2, "c3")
    lease.release()
    assert lease.consume_failed(2, "c3") == [] and lease.state is State.LEAVING, "stepping out already"
    lease.cancel_ok(2, "c3")
    lease.line_up(2, "c4")
    assert lease.token_delivered(2, "c4", 1, 0, True) == [StartRunner("d")] and lease.holding


def test_an_extra_token_during_a_hand_on_never_starts_a_runner():
    """Issue 14, cause 1: the old code popped the token, then an extra one started a runner."""
    lease = Lease("d")
    lease.line_up(1, "c1")
    lease.token_delivered(1, "c1", 1, 0, True)
    stop = lease.release()
    assert stop == [StopRunner("d", 1)] and lease.state is State.RELEASING and not lease.runner
    assert lease.token_delivered(1, "c1", 2, 0, True) == [Ack("d", 1, 2)]  # the duplicate is destroyed
    assert not lease.runner
    assert lease.runner_stopped(1) == [Cancel("d", 1, "c1")]
    assert lease.cancel_ok(1, "c1") == [Nack("d", 1, 1)] and lease.state is State.OUT


def test_a_release_waits_for_every_runner_stop_not_only_its_own():
    """Found by the stateful test: a detach's stop still running when a hand-on began; the
    hand-on's own (no-op) stop ended first, the consumer was cancelled and the next replica
    started while the detached runner was still stopping."""
    lease = Lease("d")
    lease.line_up(1, "c1")
    lease.token_delivered(1, "c1", 1, 0, True)
    first = lease.want(False)[0]
    assert first == StopRunner("d", 1)
    assert lease.release() == [StopRunner("d", 2)]
    assert lease.runner_stopped(2) == [] and lease.state is State.RELEASING
    assert lease.runner_stopped(1) == [Cancel("d", 1, "c1")] and lease.state is State.LEAVING


def test_a_reconnect_during_a_hand_on_never_nacks_a_stale_tag():
    """Issue 14: a nack of the old channel's delivery tag on the new channel closed it."""
    lease = Lease("d")
    lease.line_up(1, "c1")
    lease.token_delivered(1, "c1", 7, 0, True)
    lease.release()
    assert lease.channel_lost(1) == [] and lease.state is State.OUT
    assert lease.runner_stopped(1) == []
    lease.line_up(2, "c2")
    assert lease.cancel_ok(1, "c1") == []  # the old consumer's cancel-ok: nothing to give back
    assert lease.state is State.IN_LINE


def held_under(cfg: str, token_cfg: str, attach: bool, configured: bool = True) -> tuple[Lease, list]:
    lease = Lease("d", cfg=cfg, configured=configured)
    lease.line_up(1, "c1")
    return lease, lease.token_delivered(1, "c1", 1, 5, attach, cfg=token_cfg, since=100.0, by="r9")


def test_a_detach_under_the_same_configuration_is_kept_and_said():
    """A restart, a failover, a rolling restart: the next holder keeps the device detached and
    says why (the I/O side logs it and publishes `detached` with reason wanted-detached)."""
    lease, acts = held_under("A", "A", attach=False)
    assert acts == [Wanted("d", "wanted-detached", "A", 100.0, "r9")]
    assert lease.holding and not lease.runner and lease.wanted() is False


def test_a_detach_under_another_configuration_is_void_and_replaced_for_good():
    """A new EPSIGNAL_DEVICES: the old detach is void; the token is replaced by one saying
    "attached" under the new configuration, so an old-configuration replica cannot revive it."""
    lease, acts = held_under("B", "A", attach=False)
    assert acts == [Wanted("d", "stale-detach", "A", 100.0, "r9"), Publish("d", 6, True, "B"),
                    StartRunner("d")]
    assert lease.runner and lease.wanted() is True
    old, acts = held_under("A", "B", attach=True)  # the replacement reaches an old replica
    assert acts == [StartRunner("d")] and old.runner


def test_a_device_not_configured_follows_commands_only():
    lease, acts = held_under("B", "A", attach=False, configured=False)
    assert acts == [Wanted("d", "wanted-detached", "A", 100.0, "r9")] and not lease.runner


def test_an_older_token_in_flight_never_undoes_a_newer_wish():
    """A renewal (attach) on its way when a detach is carried out: the renewal arrives first;
    it is held (the invariant needs a token) but the detach stands, and its token wins."""
    lease = Lease("d", cfg="A")
    lease.line_up(1, "c1")
    lease.token_delivered(1, "c1", 1, 0, True, cfg="A")
    assert lease.renew() == [Publish("d", 1, True, "A", 0.0, "")]
    assert lease.want(False) == [StopRunner("d", 1), Publish("d", 2, False, "A")]
    assert lease.token_delivered(1, "c1", 2, 1, True, cfg="A") == [Ack("d", 1, 1)]  # the renewal
    assert not lease.runner and lease.wanted() is False
    assert lease.token_delivered(1, "c1", 3, 2, False, cfg="A") == [Ack("d", 1, 2)]
    assert not lease.runner and lease.pending is None and lease.token.attach is False


def test_a_queue_left_without_an_active_consumer_gets_one_when_the_orphan_is_repaired():
    """The defect, then the repair, step by step in the model: the holder's node dies, the queue
    delivers to nobody; a replica in line steps out and lines up again, and gets the token."""
    m = LeaseModel()
    m.every_replica_connected_and_in_line()
    hw = "d1"
    m.deliver(hw)
    m.replica_reads("r1", 1)
    assert m._holder(hw) is m.replicas["r1"]
    m.crash("r1", 0)  # the token is back in the queue ...
    m.the_queue_is_left_without_an_active_consumer(hw, 0)  # ... and nobody is given it
    m.deliver(hw)
    assert m._holder(hw) is None and not m.replicas["r2"].inbox
    m.an_orphan_is_repaired("r2", hw)
    m.replica_reads("r2", 1)  # cancel-ok: out of line
    assert m.replicas["r2"].lease(hw).state is State.OUT
    m.line_up("r2", hw)
    m.a_line_up_goes_on("r2", fails=1)  # its consumer made: added to a queue without an active one
    m.deliver(hw)
    m.replica_reads("r2", 1)
    assert m._holder(hw) is m.replicas["r2"] and m.replicas["r2"].lease(hw).runner
    m.exactly_one_runner_and_only_under_a_held_token()


def test_a_stuck_queue_never_makes_a_second_consumer_active_beside_a_delivery():
    """The sequence the model once found (CI, 2026-11-30): a queue marked stuck while r1 had the
    token delivered let r2's new consumer become active, and the renewed token went to r2 too.
    A single-active-consumer queue with a live delivery has its active consumer: never stuck."""
    m = LeaseModel()
    steps = [("every_replica_connected_and_in_line", {}), ("deliver", {"hw": "d2"}),
             ("channel_closed", {"name": "r2", "rare": 0}),
             ("the_queue_is_left_without_an_active_consumer", {"hw": "d2", "rare": 0}),
             ("reconnect", {"name": "r2"}), ("line_up", {"hw": "d2", "name": "r2"}),
             ("a_line_up_goes_on", {"name": "r2", "fails": 1}), ("replica_reads", {"n": 1, "name": "r1"}),
             ("renew", {"hw": "d2"}),
             ("deliver", {"hw": "d2"}), ("replica_reads", {"n": 1, "name": "r2"})]
    for name, kwargs in steps:
        getattr(m, name)(**kwargs)
        m.exactly_one_runner_and_only_under_a_held_token()
    assert [r.name for r in m.replicas.values() if r.leases["d2"].runner] == ["r1"]


def test_a_line_up_given_up_before_its_consumer_is_made_makes_none():
    """Review finding (2026-12-01): a rejoin (a holder's bounce heard) released a lease whose
    line-up still waited on its queue's declare; the consumer was made after all, one the lease
    did not know, and the token went to it and back for good. Step by step in the model."""
    m = LeaseModel()
    m.every_replica_connected_and_in_line()
    hw = "d1"
    m.release("r3", hw, holder=False)  # r3 steps out of line ...
    m.replica_reads("r3", 3)
    assert m.replicas["r3"].lease(hw).state is State.OUT
    m.line_up("r3", hw)  # ... and lines up again: its declare on its way
    m.release("r3", hw, holder=False)  # a rejoin gives that line-up up meanwhile
    m.replica_reads("r3", 3)  # cancel-ok (of a consumer never made)
    m.a_line_up_goes_on("r3", fails=1)  # the declare returns
    m.every_consumer_is_one_its_replica_s_lease_knows()
    assert not [c for c in m.queues[hw].consumers if c[0] == "r3"]
