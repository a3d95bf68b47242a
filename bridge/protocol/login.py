"""The AppWebsocket login: the digest, and both sides of the handshake without I/O.

The side that connects sends first::

    -> AppChallenge
    <- AppChallengeResult(challenge)
    -> AppLogin(app, domain, sip, guid, dn, digest, info?)
    <- AppLoginResult(ok)

``digest`` = lowercase hex SHA-256 of ``app:domain:sip:guid:dn:info:challenge:password`` (the
``info`` segment and its colon left out when no ``info`` is sent). ``info`` is hashed as the
exact JSON bytes that are sent; the verifier hashes it exactly as it arrived.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import msgspec
from msgspec import UNSET, Raw

from bridge.protocol.messages import AppChallenge, AppChallengeResult, AppLogin, AppLoginResult

CHALLENGE_LEN = 16


class LoginFailed(Exception):
    """The peer refused the login (wrong password or app name). Not a network fault."""


def digest(
    *,
    app: str,
    challenge: str,
    password: str,
    domain: str = "",
    sip: str = "",
    guid: str = "",
    dn: str = "",
    info: bytes | None = None,
) -> str:
    """The login digest; ``info`` is the exact JSON text of the info object, or None."""
    head = f"{app}:{domain}:{sip}:{guid}:{dn}:".encode()
    tail = f"{challenge}:{password}".encode()
    data = head + (info + b":" if info is not None else b"") + tail
    return hashlib.sha256(data).hexdigest()


def new_challenge() -> str:
    return secrets.token_hex(CHALLENGE_LEN // 2)


def verify(login: AppLogin, challenge: str, password: str) -> bool:
    """Check an incoming AppLogin against the challenge we sent and the expected password."""
    kw: dict[str, Any] = dict(
        app=login.app, domain=login.domain, sip=login.sip, guid=login.guid, dn=login.dn,
        challenge=challenge, password=password,
    )
    candidates = []
    if login.info is UNSET:
        candidates.append(digest(**kw))
    else:
        received = bytes(login.info)
        candidates.append(digest(info=received, **kw))
        # A sender that re-serialises info (JSON.stringify) hashes it compact, in the order sent,
        # without ASCII escapes: accept that form too when the bytes on the wire differ from it.
        compact = msgspec.json.encode(msgspec.json.decode(received))
        if compact != received:
            candidates.append(digest(info=compact, **kw))
    given = login.digest.lower().encode()
    return any(hmac.compare_digest(given, c.encode()) for c in candidates)


class ClientLogin:
    """The connecting side (the bridge in client mode, the PBX's App object in server mode)."""

    def __init__(
        self, app: str, password: str, *, info: dict[str, Any] | None = None, **ids: str
    ) -> None:
        self.app = app
        self._password = password
        self._info = msgspec.json.encode(info) if info is not None else None
        self._ids = ids  # domain, sip, guid, dn
        self.done = False

    def start(self) -> AppChallenge:
        return AppChallenge()

    def on_challenge(self, msg: AppChallengeResult) -> AppLogin:
        d = digest(app=self.app, challenge=msg.challenge, password=self._password,
                   info=self._info, **self._ids)
        return AppLogin(
            app=self.app, digest=d, info=Raw(self._info) if self._info is not None else UNSET,
            **self._ids,
        )

    def on_result(self, msg: AppLoginResult) -> None:
        if not msg.ok:
            reason = msg.error if msg.error is not UNSET else "login refused"
            raise LoginFailed(f"AppLogin as {self.app!r} refused: {reason}")
        self.done = True


class ServerLogin:
    """The verifying side: answers AppChallenge, checks AppLogin.

    ``passwords`` maps an app name to its password; a login naming another app fails.
    """

    def __init__(self, passwords: dict[str, str]) -> None:
        self._passwords = passwords
        self._challenge: str | None = None
        self.app: str | None = None  # set once logged in

    def on_challenge_request(self, msg: AppChallenge) -> AppChallengeResult:
        self._challenge = new_challenge()
        return AppChallengeResult(challenge=self._challenge, src=msg.src)

    def on_login(self, msg: AppLogin) -> AppLoginResult:
        challenge, self._challenge = self._challenge, None  # a challenge is good for one try
        password = self._passwords.get(msg.app)
        if challenge is None or password is None or not verify(msg, challenge, password):
            return AppLoginResult(ok=False, src=msg.src)
        self.app = msg.app
        return AppLoginResult(ok=True, src=msg.src)
