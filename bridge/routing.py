"""Routing-key rules for the bus. Pure functions.

Keys have a fixed number of words so that wildcard bindings stay exact::

    device.<hw>.attached | device.<hw>.detached | device.<hw>.attach.failed
    device.<hw>.call.<call>.state | device.<hw>.call.<call>.signaling
    device.<hw>.call.<call>.intercept | device.<hw>.call.<call>.intercepted  (intercept mode)
    bridge.<instance>.gap
    device.<hw>.attach | device.<hw>.detach | device.<hw>.signaling
    device.<hw>.intercept                                                (commands)
    device.<hw>.*                                 (every command of a device: a lease queue's binding)

A word is a hw id, call id or instance id with every byte outside ``[A-Za-z0-9_-]``
percent-encoded (UTF-8, upper-case hex), so ``.``, ``*``, ``#`` and spaces never split or
wildcard a key: ``00:90:33`` becomes ``00%3A90%3A33`` and ``a.b`` becomes ``a%2Eb``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import unquote

_SAFE = re.compile(r"[A-Za-z0-9_-]*")
_UNSAFE = re.compile(rb"[^A-Za-z0-9_-]")


@lru_cache(maxsize=65536)  # the same few thousand hw ids, twice per event: on the hot path
def word(value: str | int) -> str:
    """One routing-key word for an id."""
    text = str(value)
    if _SAFE.fullmatch(text):
        return text
    return _UNSAFE.sub(lambda m: b"%%%02X" % m.group()[0], text.encode()).decode("ascii")


def unword(value: str) -> str:
    """The id a routing-key word stands for (inverse of :func:`word`)."""
    return unquote(value, errors="strict")


#: the routing key of each event type, as a template whose ``{hw}``, ``{call}`` and ``{instance}``
#: stand for words: the key grammar in one place (the event factory's keys follow it, a unit test
#: holds them to it; span names and the contracts read it)
EVENT_KEYS = {
    "attached": "device.{hw}.attached",
    "detached": "device.{hw}.detached",
    "attach.failed": "device.{hw}.attach.failed",
    "call.state": "device.{hw}.call.{call}.state",
    "call.signaling": "device.{hw}.call.{call}.signaling",
    #: an intercept request (not an event: not numbered, not buffered; docs/INTERCEPT.md)
    "call.intercept": "device.{hw}.call.{call}.intercept",
    "call.intercepted": "device.{hw}.call.{call}.intercepted",
    "gap": "bridge.{instance}.gap",
}
#: the commands' verbs; a command's key is ``device.<hw>.<verb>``
VERBS = ("attach", "detach", "signaling", "intercept")
COMMAND_KEYS = {verb: f"device.{{hw}}.{verb}" for verb in VERBS}
#: what a grammar word matches in a key
_WORD = "[^.]+"
_TEMPLATES = [(re.compile("^" + re.sub(r"\\\{\w+\\\}", _WORD, re.escape(t)) + "$"), t)
              for t in (*EVENT_KEYS.values(), *COMMAND_KEYS.values())]


def template_of(key: str) -> str:
    """The low-cardinality template a routing key follows (``{other}`` for none): span names
    never carry ids."""
    for rx, template in _TEMPLATES:
        if rx.match(key):
            return template
    return "{other}"


def binding(kind: str) -> str:
    """The binding key that matches every event of ``kind`` (a key of :data:`EVENT_KEYS`):
    its template with each word a ``*``, e.g. ``device.*.call.*.state``."""
    return re.sub(r"\{\w+\}", "*", EVENT_KEYS[kind])


def device_key(hw: str, *rest: str) -> str:
    return ".".join(("device", word(hw), *rest))


def call_key(hw: str, call: int, kind: str) -> str:
    return f"device.{word(hw)}.call.{call}.{kind}"


def commands_of(hw: str) -> str:
    """The binding key every command of ``hw`` matches (a lease queue's): ``device.<hw>.*``."""
    return device_key(hw, "*")


def gap_key(instance: str) -> str:
    return f"bridge.{word(instance)}.gap"


def parse_command_key(key: str) -> tuple[str, str] | None:
    """``device.<hw>.<verb>`` -> (hw, verb), or None for a key of another shape."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "device" or not parts[1]:
        return None
    try:
        return unword(parts[1]), parts[2]
    except UnicodeDecodeError:
        return None
