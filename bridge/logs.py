"""Logging: one JSON object per line when stderr is not a terminal (for log collectors), plain
text on a terminal; every line passes a filter that masks the configured secrets, so a password
that reaches a message by accident (an exception text, a URL) never reaches the log.

Every line is bounded too (:class:`BoundLength`, after the secrets are masked): a PBX may send
anything in what ends up in a message (an ``err`` of 200 kB, a frame error's text), and no string
from outside may make a log line of any size. An argument longer than :data:`MAX_ARG_CHARS` is
cut, then the whole message at :data:`MAX_MSG_CHARS`, a traceback at :data:`MAX_EXC_CHARS` (its
head and tail kept) and an ``extra`` field at :data:`MAX_ARG_CHARS`; each cut is marked
``…(N chars cut)``.

The standard library's logging is enough here; python-json-logger was considered, but a
formatter of a dozen lines on msgspec does the same without another dependency.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, UTC

import msgspec

_encoder = msgspec.json.Encoder()
_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

#: longest text of one argument (or ``extra`` field) of a log message
MAX_ARG_CHARS = 1000
#: longest message (after its arguments were put in)
MAX_MSG_CHARS = 2000
#: longest traceback (the first and the last half are kept: where it began, what was raised)
MAX_EXC_CHARS = 8000


def clip(text: str, limit: int, *, tail: bool = False) -> str:
    """``text``, or its first ``limit`` characters (with ``tail``: its first and last half)
    and a marker saying how many were cut."""
    n = len(text) - limit
    if n <= 0:
        return text
    if tail:
        return f"{text[:limit // 2]}…({n} chars cut)…{text[-(limit - limit // 2):]}"
    return f"{text[:limit]}…({n} chars cut)"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, msg, every ``extra`` field (numbers,
    booleans and None as they are, anything else as its text, cut) and ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD:
                out[k] = v if isinstance(v, (int, float, bool, type(None))) else clip(str(v), MAX_ARG_CHARS)
        if record.exc_info:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)
        return _encoder.encode(out).decode()


def _message(record: logging.LogRecord) -> str:
    """The record's message; a call whose arguments do not fit its format string becomes that
    format string and the error (logging would otherwise raise into the caller, or print the
    arguments, unmasked and uncut, in its "Logging error" report)."""
    try:
        return record.getMessage()
    except Exception as e:
        record.msg, record.args = f"{record.msg} (arguments not formatted: {type(e).__name__}: {e})", None
        return record.msg


class RedactSecrets(logging.Filter):
    """Replaces every configured secret in a record's final text with ``***``."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = sorted({secret for secret in secrets if secret and len(secret) >= 3}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        text = _message(record)
        exc = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        if any(secret in text or secret in exc for secret in self.secrets):
            for secret in self.secrets:
                text = text.replace(secret, "***")
            record.msg, record.args = text, None
            if record.exc_info:
                for secret in self.secrets:
                    exc = exc.replace(secret, "***")
                record.exc_info, record.exc_text = None, None
                record.msg = f"{text}\n{exc}"
        return True


class BoundLength(logging.Filter):
    """Cuts what a record would write to the bounds above (add it after :class:`RedactSecrets`:
    a secret cut in two would no longer be found and masked). Costs one ``getMessage`` per
    record when nothing is too long."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = _message(record)
        if len(text) > MAX_MSG_CHARS:
            if isinstance(record.args, tuple) and record.args:  # cut the long arguments first
                record.args = tuple(_clip_arg(a) for a in record.args)
                try:
                    text = record.getMessage()
                except Exception:  # a cut argument no longer fits its format: cut the whole
                    pass
            record.msg, record.args = clip(text, MAX_MSG_CHARS), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and len(record.exc_text) > MAX_EXC_CHARS:
            record.exc_text = clip(record.exc_text, MAX_EXC_CHARS, tail=True)
        return True


def _clip_arg(a: object) -> object:
    if isinstance(a, (int, float, bool)) or a is None:
        return a
    text = a if isinstance(a, str) else str(a)
    return clip(text, MAX_ARG_CHARS) if len(text) > MAX_ARG_CHARS else a


def setup(level: str = "INFO", secrets: list[str] | None = None, as_json: bool | None = None) -> None:
    if as_json is None:
        as_json = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets or []))
    handler.addFilter(BoundLength())  # after the masking: it must see whole secrets
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("aiormq", "aio_pika", "websockets"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
