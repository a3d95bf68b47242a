"""Intercept mode's pure core (bridge.intercept): rules, the verdict's validation, the gate."""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bridge import intercept as ic
from bridge.commands import CommandError, parse
from bridge.intercept import PASS, QUEUED, Decision, Gate, Hold, Release, Rule, Rules


def gate(config: str = "*=setup:device", **defaults) -> Gate:
    return Gate(Rules(ic.parse_config(config), ic.Defaults(**defaults)), "inst", itertools.count(1))


SETUP = msgspec.Raw(b'{"type":"setup","cg":{"num":"1"}}')


# ---------------------------------------------------------------- configuration
def test_parse_config_reads_devices_and_the_default():
    cfg = ic.parse_config("009033400001=setup:device,conn:pbx; *=setup:device")
    assert cfg == {"009033400001": (Rule(type="setup", to=True), Rule(type="conn", to=False)),
                   "*": (Rule(type="setup", to=True),)}
    assert ic.parse_config("") == {}


@pytest.mark.parametrize("text, named", [
    ("setup:device", "is not <hw or *>=<type>:<device|pbx>"),
    ("*=stup:device", "sig type 'stup' is not one of setup"),
    ("*=setup", "needs a direction"),
    ("*=setup:phone", "needs a direction"),
    ("a b=setup:device", "hw id 'a b' is not valid"),
    ("*=setup:device;*=conn:pbx", "names '*' twice"),
])
def test_parse_config_names_the_mistake(text, named):
    with pytest.raises(ValueError, match="EPSIGNAL_INTERCEPT") as e:
        ic.parse_config(text)
    assert named in str(e.value)


def test_a_device_entry_replaces_the_default_and_commands_win():
    rules = Rules(ic.parse_config("dev1=conn:pbx;*=setup:device"), ic.Defaults(300, "closed", 17))
    assert rules.match("other", "setup", True).deadline_ms == 300
    assert rules.match("dev1", "setup", True) is None
    assert rules.match("dev1", "conn", False).fail == "closed"
    eff = rules.set_command("dev1", [Rule(type="conn", to=False, deadline_ms=100, fail="open")])
    assert [(e.type, e.to, e.deadline_ms, e.fail, e.cause, e.source) for e in eff] == [
        ("conn", False, 100, "open", 17, "command")]
    eff = rules.set_command("other", [Rule(type="alert", to=True)])
    assert {(e.type, e.source) for e in eff} == {("setup", "config"), ("alert", "command")}
    rules.set_command("other", [])
    assert [e.type for e in rules.effective("other")] == ["setup"]


def test_rules_are_off_until_some_device_has_one():
    rules = Rules()
    assert not rules.on and rules.match("x", "setup", True) is None
    rules.set_command("x", [Rule(type="setup", to=True)])
    assert rules.on and rules.watch == {"x"} and not rules.everyone
    rules.set_command("x", [])
    assert not rules.on and not rules.watch
    everyone = Rules(ic.parse_config("dev1=conn:pbx;*=setup:device"))
    assert everyone.on and everyone.everyone and everyone.watch == {"dev1"}


@pytest.mark.parametrize("body, named", [
    (b'{"rules":[{"type":"setup","to":true,"deadline_ms":5}]}', "$.rules[0].deadline_ms"),
    (b'{"rules":[{"type":"stup","to":true}]}', "$.rules[0].type"),
    (b'{"rules":[{"type":"setup"}]}', "missing required field `to`"),
    (b'{"rules":[{"type":"setup","to":true,"fail":"shut"}]}', "$.rules[0].fail"),
    (b'{"rules":[{"type":"setup","to":true,"cause":128}]}', "$.rules[0].cause"),
    (b'{"rules":[{"type":"setup","to":true,"Deadline":1}]}', "unknown field `Deadline`"),
    (b'{"rules":[], "x":1}', "unknown field `x`"),
])
def test_intercept_command_is_strict(body, named):
    with pytest.raises(CommandError) as e:
        parse("device.hw1.intercept", body)
    assert named in str(e.value)


# ---------------------------------------------------------------- verdicts
def hold(sig_type: str = "setup") -> Hold:
    rule = Rules(ic.parse_config(f"*={sig_type}:device")).match("hw", sig_type, True)
    return Hold("inst/hw/i1", "hw", 1, True, sig_type, SETUP, None, rule, 0.0, 0.25)


@pytest.mark.parametrize("body, decision", [
    (b'{"id":"inst/hw/i1","verdict":"forward"}', Decision("forward")),
    (b'{"id":"inst/hw/i1","verdict":"reject"}', Decision("reject", cause=21)),
    (b'{"id":"inst/hw/i1","verdict":"reject","cause":17,"v":1}', Decision("reject", cause=17)),
])
def test_valid_verdicts(body, decision):
    assert ic.validate_verdict(body, hold()) == decision


def test_a_replacement_keeps_its_bytes():
    d = ic.validate_verdict(b'{"id":"inst/hw/i1","verdict":"forward","sig":{"type":"setup","x":[1]}}', hold())
    assert d.outcome == "replace" and bytes(d.sig) == b'{"type":"setup","x":[1]}'


@pytest.mark.parametrize("body, reason", [
    (b'{"id":"inst/hw/i1","verdict":"drop"}', "$.verdict"),
    (b'{"id":"inst/hw/i1","verdict":"reject","cause":0}', "$.cause"),
    (b'{"id":"inst/hw/i1","verdict":"reject","cause":200}', "$.cause"),
    (b'{"id":"inst/hw/i1","verdict":"forward","extra":1}', "unknown field `extra`"),
    (b'{"id":"inst/hw/i1","verdict":"forward","cause":21}', "only for a reject"),
    (b'{"id":"inst/hw/i1","verdict":"reject","sig":{"type":"setup"}}', "only for a forward"),
    (b'{"id":"inst/hw/i1","verdict":"forward","sig":[1]}', "Expected `object` - at `$.sig`"),
    (b'{"id":"inst/hw/i1","verdict":"forward","sig":{"type":"alert"}}', "is not the held message's 'setup'"),
    (b'{"id":"inst/hw/i1","verdict":"forward","sig":{"type":"setup","cg":5}}', "$.sig.cg"),
    (b'{"id":"other","verdict":"forward"}', "not the request's id"),
    (b'{"id":"inst/hw/i1","verdict":"forward","v":2}', "schema version"),
    (b'{"id":"inst/hw/i1","verdict":"forward"', "not JSON"),
    (b'{"id":"inst/hw/i1\xff","verdict":"forward"}', "not valid UTF-8"),
    (b'{"id":"' + b"x" * 70000 + b'"}', "exceeds the limit"),
])
def test_bad_verdicts_say_why(body, reason):
    d = ic.validate_verdict(body, hold())
    assert d.outcome == "bad-verdict" and reason in d.error, d.error


# ---------------------------------------------------------------- the gate
def test_only_matching_messages_of_calls_are_held():
    g = gate()
    assert g.offer("hw", 1, True, "alert", SETUP, "a", 0.0) is PASS
    assert g.offer("hw", 1, False, "setup", SETUP, "b", 0.0) is PASS
    assert g.offer("hw", -1, True, "setup", SETUP, "c", 0.0) is PASS  # application calls: never
    assert g.offer("hw", 1, True, None, SETUP, "d", 0.0) is PASS  # a sig not understood
    [h] = g.offer("hw", 1, True, "setup", SETUP, "e", 0.0)
    assert h.id == "inst/hw/i1" and h.deadline == 0.25
    assert g.next_deadline() == 0.25


def test_later_messages_of_the_call_wait_in_order_others_do_not():
    g = gate("*=setup:device,conn:device")
    [h] = g.offer("hw", 1, True, "setup", SETUP, "setup1", 0.0)
    assert g.offer("hw", 1, False, "alert", SETUP, "alert1", 0.01) is QUEUED
    assert g.offer("hw", 1, True, "conn", SETUP, "conn1", 0.02) is QUEUED
    assert g.offer("hw", 1, True, "info", SETUP, "info1", 0.02) is QUEUED
    assert g.offer("hw", 2, True, "alert", SETUP, "other", 0.02) is PASS
    steps = g.decide(h.id, Decision("forward"), 0.1)
    assert [(type(s).__name__, s.item) for s in steps] == [
        ("Release", "setup1"), ("Release", "alert1"), ("Hold", "conn1")]
    assert steps[0].waited == pytest.approx(0.1)
    assert g.decide(h.id, Decision("forward"), 0.1) is None  # late: ignored
    [r, q] = g.decide(steps[2].id, Decision("reject", cause=17), 0.2)
    assert (r.action, r.cause, q.item, q.action, q.hold) == ("rejected", 17, "info1", "forwarded", None)
    # the session is carrying them out: a new message still queues, then comes with settle
    assert g.offer("hw", 1, True, "disc", SETUP, "disc1", 0.3) is QUEUED
    assert [s.item for s in g.settle("hw", 1, 0.3)] == ["disc1"]
    assert g.settle("hw", 1, 0.3) == []
    assert g.offer("hw", 1, True, "disc", SETUP, "disc2", 0.3) is PASS


@pytest.mark.parametrize("fail, outcome, action, cause", [
    ("open", "timeout", "forwarded", None), ("closed", "timeout", "rejected", 34),
    ("open", "unroutable", "forwarded", None), ("closed", "broker-down", "rejected", 34),
    ("closed", "bad-verdict", "forwarded", None),
])
def test_the_fail_policy(fail, outcome, action, cause):
    g = gate(fail=fail, cause=34)
    [h] = g.offer("hw", 1, True, "setup", SETUP, "s", 0.0)
    assert g.expired(0.2) == [] and g.expired(0.25) == [h.id]
    [r] = g.decide(h.id, Decision(outcome, error="x" if outcome == "bad-verdict" else None), 0.25)
    assert (r.outcome, r.action, r.cause) == (outcome, action, cause)


def test_stop_gives_every_hold_its_policy_and_lets_the_queue_go():
    g = gate("*=setup:device,conn:device")
    [h1] = g.offer("hw", 1, True, "setup", SETUP, "a", 0.0)
    assert g.held == {h1.id: h1} and h1.item == "a"
    assert g.offer("hw", 1, True, "conn", SETUP, "b", 0.0) is QUEUED
    g.offer("hw", 2, True, "setup", SETUP, "c", 0.0)
    out = g.drain("stopping", 0.1)
    assert [(r.item, r.outcome, r.action) for r in out] == [
        ("a", "stopping", "forwarded"), ("b", "stopping", "forwarded"), ("c", "stopping", "forwarded")]
    assert not g.held
    # stopping: a new message a rule matches is not held
    g.settle("hw", 1, 0.1)
    [r] = g.offer("hw", 1, True, "setup", SETUP, "d", 0.1)
    assert type(r) is Release and r.outcome == "stopping"


def test_a_lost_session_drops_its_holds():
    g = gate()
    g.offer("hw", 1, True, "setup", SETUP, "a", 0.0)
    g.offer("hw", 1, True, "alert", SETUP, "b", 0.0)
    [r] = g.lost(0.5)
    assert (r.item, r.outcome, r.action) == ("a", "session-lost", "dropped")
    assert not g.held and not g.busy("hw", 1)


# ---------------------------------------------------------------- the model
TYPES = ("setup", "conn", "alert")


class GateModel(RuleBasedStateMachine):
    """Random offers, verdicts, time and settles: every message is released exactly once, in its
    call's order; a call with nothing held never waits; no hold outlives its deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.g = Gate(Rules(ic.parse_config("*=setup:device,conn:pbx;b=alert:device")),
                      "i", itertools.count(1))
        self.now = 0.0
        self.n = 0
        self.offered: dict[tuple[str, int], list[int]] = {}
        self.sent: dict[tuple[str, int], list[int]] = {}
        self.unsettled: set[tuple[str, int]] = set()
        self.keys: dict[int, tuple[str, int]] = {}

    def carry(self, key, steps) -> None:
        for s in steps:
            if type(s) is Release:
                assert s.action != "dropped"
                self.sent.setdefault(key, []).append(s.item)
                if s.hold is not None:
                    assert s.waited <= s.hold.rule.deadline_ms / 1000 + 1e-9
            else:
                assert s.deadline == s.started + s.rule.deadline_ms / 1000
        self.unsettled.add(key)

    @rule(hw=st.sampled_from("ab"), call=st.integers(1, 3), to=st.booleans(),
          sig_type=st.sampled_from(TYPES))
    def offer(self, hw, call, to, sig_type):
        key = (hw, call)
        self.n += 1
        self.offered.setdefault(key, []).append(self.n)
        self.keys[self.n] = key
        was_busy = self.g.busy(hw, call)
        r = self.g.offer(hw, call, to, sig_type, SETUP, self.n, self.now)
        if r is QUEUED:
            assert was_busy
        elif r is PASS:
            assert not was_busy and self.g.rules.match(hw, sig_type, to) is None
            self.sent.setdefault(key, []).append(self.n)
        else:
            self.carry(key, r)

    @precondition(lambda self: self.g.held)
    @rule(data=st.data(), verdict=st.sampled_from(["forward", "reject", "replace", "bad-verdict"]))
    def decide(self, data, verdict):
        h = data.draw(st.sampled_from(sorted(self.g.held.values(), key=lambda h: h.id)))
        self.carry((h.hw, h.call), self.g.decide(h.id, Decision(verdict), self.now))

    @precondition(lambda self: self.unsettled)
    @rule(data=st.data())
    def settle(self, data):
        key = data.draw(st.sampled_from(sorted(self.unsettled)))
        self.unsettled.discard(key)
        steps = self.g.settle(*key, self.now)
        if steps:
            self.carry(key, steps)

    @rule(dt=st.floats(0.001, 1.0))
    def time_passes(self, dt):
        # the adapter's timer fires at the next deadline
        self.now = min(self.now + dt, self.g.next_deadline())
        for id in self.g.expired(self.now):
            h = self.g.held[id]
            self.carry((h.hw, h.call), self.g.decide(id, Decision("timeout"), self.now))

    @invariant()
    def no_hold_is_late(self):
        assert all(h.deadline > self.now or h.deadline == self.g.next_deadline() for h in self.g.held.values())

    @invariant()
    def order_kept_nothing_twice(self):
        for key, sent in self.sent.items():
            assert sent == self.offered[key][:len(sent)]

    def teardown(self):
        for r in self.g.drain("stopping", self.now):
            self.carry(self.keys[r.item], [r])
        while self.unsettled:
            key = self.unsettled.pop()
            steps = self.g.settle(*key, self.now)
            if steps:
                self.carry(key, steps)
        assert self.sent == self.offered


GateModel.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestGateModel = GateModel.TestCase


def test_tail_shows_an_intercepted_event_on_one_line():
    from bridge.events import EventFactory
    from bridge.tools import format_event

    ev = EventFactory("i").intercepted("hw1", 7, True, "i/hw1/i1", "setup", "reject", "rejected", 3.25, cause=21)
    line = format_event(ev.key, ev.body)
    assert line.endswith("hw1 call     7 intercepted setup: reject -> rejected after 3.25 ms cause 21")


def test_lease_tokens_carry_rules_additively_and_leniently():
    from bridge.amqp.leases import TOKEN_DECODER, TOKEN_ENCODER, Token

    old = TOKEN_DECODER.decode(b'{"v":1,"hw":"h","gen":3}')  # a token of a bridge before issue 18
    assert old.intercept == [] and b"intercept" not in TOKEN_ENCODER.encode(old)
    tok = Token(hw="h", gen=4, intercept=[Rule(type="setup", to=True, deadline_ms=300)])
    again = TOKEN_DECODER.decode(TOKEN_ENCODER.encode(tok))
    assert msgspec.convert(again.intercept, list[Rule]) == [Rule(type="setup", to=True, deadline_ms=300)]
    # rules a later version writes do not make the token unreadable (it would lose the device)
    odd = TOKEN_DECODER.decode(b'{"hw":"h","gen":5,"intercept":[{"type":"setup","to":true,"new":1}]}')
    assert odd.gen == 5
