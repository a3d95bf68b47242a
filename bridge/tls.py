"""TLS client contexts for wss:// and amqps://: certificate and host name verification on by
default, against the system's CA store or a given CA bundle."""

from __future__ import annotations

import ssl


def client_context(ca_file: str = "", verify: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file or None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
