"""What a valid hw id and a valid call id are on the bus: the one place for both rules.

They are checked where ids come in from outside: command routing keys and bodies
(:mod:`bridge.commands`) and ``EPSIGNAL_DEVICES`` (:func:`check_devices`). The Structs use
:data:`HwId` and :data:`CallId`, so the JSON Schemas in ``contracts/`` state the same rules.

- **hw id**: 1 to :data:`HW_MAX_LENGTH` (64) characters, each an ASCII letter or digit or one of
  ``-`` ``_`` ``.`` ``:`` ``@``. innovaphone hw ids are the names devices register with: the MAC
  address (``009033400001``, also written ``00:90:33:40:00:01``) or a configured name
  (``phone-1.lobby``). Not allowed: whitespace, control characters, non-ASCII, and the
  characters that mean something elsewhere (``*`` ``#`` wildcards, ``%`` escapes, ``/`` ``+``
  ...). The length bound keeps every routing key within AMQP's 255 bytes even when each
  character is percent-encoded (``device.`` + 3 x 64 + ``.call.-2147483648.signaling`` = 226).
- **call id** (commands): a signed 32-bit integer other than 0, as the PBX uses them: positive
  ids are the PBX's calls, negative ids are calls the application starts. Events carry the ids
  the PBX sent, unchecked: a PBX's call is forwarded whatever its id (calls come first).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated

from msgspec import Meta

HW_MAX_LENGTH = 64
#: the characters of a hw id besides ASCII letters and digits
HW_PUNCTUATION = "-_.:@"
_HW = re.compile(rf"[A-Za-z0-9_.:@-]{{1,{HW_MAX_LENGTH}}}")
HW_PATTERN = f"^{_HW.pattern}$"  # for the JSON Schemas (ECMA-262: `$` is the end of the text)
HW_RULE = (f"1 to {HW_MAX_LENGTH} characters, each an ASCII letter or digit or one of "
           + " ".join(f"`{c}`" for c in HW_PUNCTUATION))
CALL_MIN, CALL_MAX = -(2**31), 2**31 - 1
CALL_RULE = (f"a non-zero integer from {CALL_MIN} to {CALL_MAX}: positive for the PBX's calls, "
             "negative for calls the application starts")

HwId = Annotated[str, Meta(pattern=HW_PATTERN, min_length=1, max_length=HW_MAX_LENGTH)]
CallId = Annotated[int, Meta(ge=CALL_MIN, le=CALL_MAX, extra_json_schema={"not": {"const": 0}})]


def valid_hw(hw: str) -> bool:
    return _HW.fullmatch(hw) is not None


def hw_error(hw: str) -> str | None:
    """Why ``hw`` is not a valid hw id (None: it is)."""
    if valid_hw(hw):
        return None
    if not hw:
        what = "it is empty"
    elif len(hw) > HW_MAX_LENGTH:
        what = f"it has {len(hw)} characters"
    else:
        bad = next(c for c in hw if c not in HW_PUNCTUATION and not (c.isascii() and c.isalnum()))
        what = f"character {bad!r} at {hw.index(bad)}"
    return f"hw id {hw[:80]!r} is not valid ({what}): a hw id is {HW_RULE}"


def valid_call(call: int) -> bool:
    return call != 0 and CALL_MIN <= call <= CALL_MAX


def check_devices(hws: Iterable[str]) -> None:
    """Raise ValueError naming every invalid hw id (for ``EPSIGNAL_DEVICES``)."""
    errors = [e for e in map(hw_error, hws) if e is not None]
    if errors:
        raise ValueError("EPSIGNAL_DEVICES: " + "; ".join(errors))
