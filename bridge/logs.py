"""Logging: one JSON object per line when stderr is not a terminal (for log collectors), plain
text on a terminal; every line passes a filter that masks the configured secrets, so a password
that reaches a message by accident (an exception text, a URL) never reaches the log.

The standard library's logging is enough here; python-json-logger was considered, but a
formatter of a dozen lines on msgspec does the same without another dependency.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone

import msgspec

_encoder = msgspec.json.Encoder()
_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD:
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(out).decode()


class RedactSecrets(logging.Filter):
    """Replaces every configured secret in a record's final text with ``***``."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        text = record.getMessage()
        exc = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        if any(s in text or s in exc for s in self.secrets):
            for s in self.secrets:
                text = text.replace(s, "***")
            record.msg, record.args = text, None
            if record.exc_info:
                for s in self.secrets:
                    exc = exc.replace(s, "***")
                record.exc_info, record.exc_text = None, None
                record.msg = f"{text}\n{exc}"
        return True


def setup(level: str = "INFO", secrets: list[str] | None = None, as_json: bool | None = None) -> None:
    if as_json is None:
        as_json = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets or []))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("aiormq", "aio_pika", "websockets"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
