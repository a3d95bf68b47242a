"""The one error type for frames the bridge cannot use, and the one place msgspec's decode
errors become it."""

from __future__ import annotations

from typing import Any

import msgspec


class FrameError(ValueError):
    """A frame that cannot be used. ``kind`` is one of :attr:`KINDS`; the text says why."""

    KINDS = ("too-large", "not-json", "not-object", "unknown-mt", "invalid")

    def __init__(self, kind: str, detail: str) -> None:
        assert kind in self.KINDS, kind
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


#: what msgspec's decoders raise for bad input
DECODE_ERRORS = (msgspec.MsgspecError, UnicodeDecodeError, RecursionError)


def decode_error(e: BaseException, at: str = "") -> FrameError:
    """The :class:`FrameError` for a failure of a msgspec decode (one of :data:`DECODE_ERRORS`).
    ``at``: where the decoded data sits in its frame (e.g. ``$.sig``), put into the error's JSON
    path (msgspec gives none for an error at the root)."""
    if isinstance(e, msgspec.ValidationError):
        text = str(e)
        if at:
            text = text.replace("`$", f"`{at}", 1) if "`$" in text else f"{text} - at `{at}`"
        return FrameError("invalid", text)
    if isinstance(e, UnicodeDecodeError):  # invalid UTF-8 inside a string
        return FrameError("not-json", f"{at + ': ' if at else ''}invalid UTF-8: {e}")
    if isinstance(e, RecursionError):
        return FrameError("invalid", f"{at + ' ' if at else ''}nested too deeply")
    return FrameError("not-json", f"{at}: {e}" if at else str(e))


def decode(decoder: msgspec.json.Decoder, data: Any, at: str = "") -> Any:
    """``decoder.decode(data)``; every failure a :class:`FrameError` (:func:`decode_error`)."""
    try:
        return decoder.decode(data)
    except DECODE_ERRORS as e:
        raise decode_error(e, at) from None
