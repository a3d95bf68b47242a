"""The AppWebsocket login digest and both sides of the handshake (EPSIGNAL.md section 1)."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest
from msgspec import UNSET

from bridge.protocol.login import ClientLogin, LoginFailed, ServerLogin, digest, verify
from bridge.protocol.messages import (
    AppChallenge,
    AppChallengeResult,
    AppLogin,
    AppLoginResult,
    decode,
    encode,
)

# ------------------------------------------------------------------ official vectors
VECTOR_CHALLENGE = "0123456789abcdef"
VECTOR_PASSWORD = "pwd"
DIGEST_NO_INFO = "a205299ed2ef2786c311e0be1b14db343f2cadd906a6ae7b564eee34bda5e9a1"
DIGEST_WITH_INFO = "96db3c3f657230c2b68194becc6d2a77f05de9f79f01fc81e9ca0fb196b10d9d"

# A real AppLogin sent by a PBX App object (password "go", challenge "16d7dbbcccb63612").
REAL_CHALLENGE = "16d7dbbcccb63612"
REAL_PASSWORD = "go"
REAL_LOGIN = (
    b'{"mt":"AppLogin","sip":"go-search","guid":"3954ae7854c96301c9dd009033400109",'
    b'"dn":"go-search","digest":"130f168773ff760701b74e629eca2544c6e62d5354e92e6f821001a982eb8951",'
    b'"domain":"fritz.box","app":"searchapi","info":{"appobj":"go-search","appdn":"go-search",'
    b'"appurl":"http://192.168.178.29:5000/fritz.box/go/instance/searchapi","pbx":"pbx-main",'
    b'"cn":"go-search","unlicensed":true,"apps":[]}}'
)
REAL_INFO = REAL_LOGIN[REAL_LOGIN.index(b'"info":') + len(b'"info":') : -1]


def test_official_vector_without_info() -> None:
    got = digest(app="pbxadminapi", challenge=VECTOR_CHALLENGE, password=VECTOR_PASSWORD)
    assert got == DIGEST_NO_INFO
    # the documented digest input, hashed by hand, gives the same value
    assert hashlib.sha256(b"pbxadminapi:::::0123456789abcdef:pwd").hexdigest() == DIGEST_NO_INFO


def test_official_vector_with_info() -> None:
    got = digest(
        app="pbxadminapi", challenge=VECTOR_CHALLENGE, password=VECTOR_PASSWORD,
        info=b'{"cn":"Test User"}',
    )
    assert got == DIGEST_WITH_INFO
    raw = b'pbxadminapi:::::{"cn":"Test User"}:0123456789abcdef:pwd'
    assert hashlib.sha256(raw).hexdigest() == DIGEST_WITH_INFO


def test_digest_is_lowercase_hex_sha256() -> None:
    got = digest(app="x", challenge="c", password="p")
    assert len(got) == 64
    assert set(got) <= set("0123456789abcdef")


def test_digest_empty_info_object_is_not_the_same_as_no_info() -> None:
    with_empty = digest(app="a", challenge="c", password="p", info=b"{}")
    without = digest(app="a", challenge="c", password="p")
    assert with_empty != without
    assert with_empty == hashlib.sha256(b"a:::::{}:c:p").hexdigest()


def test_digest_fields_in_documented_order() -> None:
    got = digest(app="a", domain="d", sip="s", guid="g", dn="n", challenge="c", password="p",
                 info=b'{"k":1}')
    assert got == hashlib.sha256(b'a:d:s:g:n:{"k":1}:c:p').hexdigest()


def test_official_vectors_verify_as_applogin() -> None:
    app = "pbxadminapi"
    without = AppLogin(app=app, digest=DIGEST_NO_INFO)
    assert verify(without, VECTOR_CHALLENGE, VECTOR_PASSWORD)
    with_info = decode(
        b'{"mt":"AppLogin","app":"pbxadminapi","digest":"' + DIGEST_WITH_INFO.encode()
        + b'","info":{"cn":"Test User"}}'
    )
    assert isinstance(with_info, AppLogin)
    assert verify(with_info, VECTOR_CHALLENGE, VECTOR_PASSWORD)
    # the digest without info does not verify a login that sends info, and vice versa
    assert not verify(AppLogin(app=app, digest=DIGEST_WITH_INFO), VECTOR_CHALLENGE, VECTOR_PASSWORD)


def test_digest_upper_case_hex_is_accepted() -> None:
    login = AppLogin(app="pbxadminapi", digest=DIGEST_NO_INFO.upper())
    assert verify(login, VECTOR_CHALLENGE, VECTOR_PASSWORD)


# ------------------------------------------------------------------ the real PBX login
def real_login() -> AppLogin:
    msg = decode(REAL_LOGIN)
    assert isinstance(msg, AppLogin)
    return msg


def test_real_pbx_login_decodes() -> None:
    msg = real_login()
    assert msg.app == "searchapi"
    assert msg.domain == "fritz.box"
    assert msg.sip == "go-search"
    assert msg.dn == "go-search"
    assert msg.guid == "3954ae7854c96301c9dd009033400109"
    assert msg.pbxObj is UNSET
    assert bytes(msg.info) == REAL_INFO
    assert json.loads(bytes(msg.info))["unlicensed"] is True


def test_real_pbx_login_verifies() -> None:
    assert verify(real_login(), REAL_CHALLENGE, REAL_PASSWORD)


def test_real_pbx_login_digest_recomputed() -> None:
    msg = real_login()
    got = digest(app=msg.app, domain=msg.domain, sip=msg.sip, guid=msg.guid, dn=msg.dn,
                 challenge=REAL_CHALLENGE, password=REAL_PASSWORD, info=bytes(msg.info))
    assert got == msg.digest


def test_real_pbx_login_wrong_password() -> None:
    assert not verify(real_login(), REAL_CHALLENGE, "Go")
    assert not verify(real_login(), REAL_CHALLENGE, "")
    assert not verify(real_login(), REAL_CHALLENGE, "go ")


def test_real_pbx_login_wrong_challenge() -> None:
    assert not verify(real_login(), "16d7dbbcccb63613", REAL_PASSWORD)
    assert not verify(real_login(), VECTOR_CHALLENGE, REAL_PASSWORD)


def test_real_pbx_login_tampered_info_byte() -> None:
    # one info byte changed: "pbx-main" -> "pbx-maim"
    tampered = REAL_LOGIN.replace(b'"pbx":"pbx-main"', b'"pbx":"pbx-maim"')
    assert tampered != REAL_LOGIN
    msg = decode(tampered)
    assert isinstance(msg, AppLogin)
    assert not verify(msg, REAL_CHALLENGE, REAL_PASSWORD)


def test_real_pbx_login_tampered_identity_fields() -> None:
    for old, new in [(b'"sip":"go-search"', b'"sip":"go-searcH"'),
                     (b'"domain":"fritz.box"', b'"domain":"fritz.bo"'),
                     (b'"app":"searchapi"', b'"app":"searchap1"')]:
        msg = decode(REAL_LOGIN.replace(old, new))
        assert isinstance(msg, AppLogin)
        assert not verify(msg, REAL_CHALLENGE, REAL_PASSWORD), old


def test_real_pbx_login_pbxobj_is_not_hashed() -> None:
    frame = REAL_LOGIN[:-1] + b',"pbxObj":"anything"}'
    msg = decode(frame)
    assert isinstance(msg, AppLogin) and msg.pbxObj == "anything"
    assert verify(msg, REAL_CHALLENGE, REAL_PASSWORD)


# ------------------------------------------------------------------ handshake round trips
def run_handshake(client: ClientLogin, server: ServerLogin) -> tuple[AppLogin, AppLoginResult]:
    """Drive both sides through real frames (encode -> decode on every hop)."""
    req = decode(encode(client.start()))
    assert isinstance(req, AppChallenge)
    challenge = decode(encode(server.on_challenge_request(req)))
    assert isinstance(challenge, AppChallengeResult)
    assert 0 < len(challenge.challenge) <= 16
    login = decode(encode(client.on_challenge(challenge)))
    assert isinstance(login, AppLogin)
    result = decode(encode(server.on_login(login)))
    assert isinstance(result, AppLoginResult)
    return login, result


INFOS = [
    None,
    {"cn": "Test User"},
    {"cn": "Müller"},
    {"cn": "東京", "emoji": "☎️", "n": 1, "nested": {"a": [1, 2.5, None, True]}},
    {},
]


@pytest.mark.parametrize("info", INFOS, ids=["no-info", "ascii", "umlaut", "mixed", "empty"])
def test_client_server_round_trip(info: dict | None) -> None:
    client = ClientLogin("epsignal", "s3cret", info=info)
    server = ServerLogin({"epsignal": "s3cret"})
    login, result = run_handshake(client, server)
    assert result.ok is True
    assert server.app == "epsignal"
    client.on_result(result)
    assert client.done is True
    if info is None:
        assert login.info is UNSET
    else:
        assert json.loads(bytes(login.info)) == info


def test_client_round_trip_with_ids() -> None:
    client = ClientLogin("epsignal", "pw", domain="example.com", sip="bridge", guid="g1", dn="Br")
    server = ServerLogin({"epsignal": "pw"})
    login, result = run_handshake(client, server)
    assert (login.domain, login.sip, login.guid, login.dn) == ("example.com", "bridge", "g1", "Br")
    assert result.ok is True


@pytest.mark.parametrize("info", INFOS[1:], ids=["ascii", "umlaut", "mixed", "empty"])
def test_client_sends_info_exactly_as_hashed(info: dict) -> None:
    client = ClientLogin("epsignal", "pw", info=info)
    frame = encode(client.on_challenge(AppChallengeResult(challenge="abcdef0123456789")))
    sent = json.loads(frame)
    # the info bytes as they appear in the frame on the wire
    start = frame.index(b'"info":') + len(b'"info":')
    info_bytes = bytes(decode(frame).info)
    assert frame[start:start + len(info_bytes)] == info_bytes
    assert sent["info"] == info
    # compact, no ASCII escaping, keys in the order given (what JSON.stringify produces)
    assert info_bytes == json.dumps(info, separators=(",", ":"), ensure_ascii=False).encode()
    expected = digest(app="epsignal", challenge="abcdef0123456789", password="pw",
                      info=info_bytes)
    assert sent["digest"] == expected
    # and an independent hash of the documented input matches too
    raw = b"epsignal:::::" + info_bytes + b":abcdef0123456789:pw"
    assert sent["digest"] == hashlib.sha256(raw).hexdigest()


def test_client_info_non_ascii_is_utf8_not_escaped() -> None:
    client = ClientLogin("epsignal", "pw", info={"cn": "Müller"})
    frame = encode(client.on_challenge(AppChallengeResult(challenge="c")))
    assert '"info":{"cn":"Müller"}'.encode() in frame
    assert b"\\u00fc" not in frame


def test_client_without_info_sends_no_info_field() -> None:
    client = ClientLogin("epsignal", "pw")
    frame = encode(client.on_challenge(AppChallengeResult(challenge="c")))
    sent = json.loads(frame)
    assert "info" not in sent
    assert sent["digest"] == hashlib.sha256(b"epsignal:::::c:pw").hexdigest()


def test_verifier_accepts_reserialised_info() -> None:
    # A sender that puts spaces on the wire but hashes the compact form is accepted.
    info_compact = b'{"cn":"M\xc3\xbcller","a":[1,2]}'
    d = digest(app="app", challenge="c", password="p", info=info_compact)
    frame = b'{"mt":"AppLogin","app":"app","digest":"' + d.encode() + \
        b'","info":{ "cn" : "M\\u00fcller", "a" : [1, 2] }}'
    msg = decode(frame)
    assert isinstance(msg, AppLogin)
    assert verify(msg, "c", "p")
    assert not verify(msg, "c", "q")


def test_wrong_password_is_refused() -> None:
    client = ClientLogin("epsignal", "wrong")
    server = ServerLogin({"epsignal": "right"})
    _, result = run_handshake(client, server)
    assert result.ok is False
    assert server.app is None
    with pytest.raises(LoginFailed) as e:
        client.on_result(result)
    assert "epsignal" in str(e.value)
    assert client.done is False


def test_result_without_ok_is_refused() -> None:
    result = decode(b'{"mt":"AppLoginResult"}')
    assert isinstance(result, AppLoginResult) and result.ok is False
    client = ClientLogin("epsignal", "pw")
    with pytest.raises(LoginFailed):
        client.on_result(result)
    assert client.done is False


def test_result_error_text_is_in_login_failed() -> None:
    client = ClientLogin("epsignal", "pw")
    with pytest.raises(LoginFailed, match="bad password"):
        client.on_result(AppLoginResult(ok=False, error="bad password"))


def test_login_failed_is_not_a_network_error() -> None:
    assert not issubclass(LoginFailed, OSError)
    assert not issubclass(LoginFailed, ConnectionError)


def test_challenge_is_good_for_one_try_only() -> None:
    server = ServerLogin({"epsignal": "pw"})
    client = ClientLogin("epsignal", "pw")
    challenge = server.on_challenge_request(AppChallenge())
    login = client.on_challenge(challenge)
    first = server.on_login(login)
    assert first.ok is True
    # the same AppLogin again (a replay), without a new challenge: refused
    second = server.on_login(login)
    assert second.ok is False


def test_failed_try_also_consumes_the_challenge() -> None:
    server = ServerLogin({"epsignal": "pw"})
    challenge = server.on_challenge_request(AppChallenge())
    bad = ClientLogin("epsignal", "nope").on_challenge(challenge)
    assert server.on_login(bad).ok is False
    good = ClientLogin("epsignal", "pw").on_challenge(challenge)
    assert server.on_login(good).ok is False  # the challenge is spent


def test_login_without_challenge_is_refused() -> None:
    server = ServerLogin({"epsignal": "pw"})
    login = ClientLogin("epsignal", "pw").on_challenge(AppChallengeResult(challenge="guess"))
    assert server.on_login(login).ok is False
    assert server.app is None


def test_new_challenge_each_time() -> None:
    server = ServerLogin({"epsignal": "pw"})
    seen = {server.on_challenge_request(AppChallenge()).challenge for _ in range(20)}
    assert len(seen) == 20
    assert all(len(c) == 16 and set(c) <= set("0123456789abcdef") for c in seen)


def test_old_challenge_is_replaced_by_a_new_request() -> None:
    server = ServerLogin({"epsignal": "pw"})
    old = server.on_challenge_request(AppChallenge())
    server.on_challenge_request(AppChallenge())
    login = ClientLogin("epsignal", "pw").on_challenge(old)
    assert server.on_login(login).ok is False


def test_login_naming_another_app_fails() -> None:
    server = ServerLogin({"epsignal": "pw"})
    # right password, but for an app the server does not know
    client = ClientLogin("other", "pw")
    _, result = run_handshake(client, server)
    assert result.ok is False
    assert server.app is None


def test_login_with_password_of_another_app_fails() -> None:
    server = ServerLogin({"a": "pw-a", "b": "pw-b"})
    _, result = run_handshake(ClientLogin("a", "pw-b"), server)
    assert result.ok is False
    server2 = ServerLogin({"a": "pw-a", "b": "pw-b"})
    _, result2 = run_handshake(ClientLogin("b", "pw-b"), server2)
    assert result2.ok is True and server2.app == "b"


def test_src_is_echoed_by_the_server() -> None:
    server = ServerLogin({"epsignal": "pw"})
    challenge = server.on_challenge_request(AppChallenge(src="req-1"))
    assert challenge.src == "req-1"
    login = ClientLogin("epsignal", "pw").on_challenge(challenge)
    login = msgspec.structs.replace(login, src="req-2")
    result = server.on_login(login)
    assert result.ok is True and result.src == "req-2"


def test_server_verifies_the_real_pbx_login() -> None:
    # The server side with the real PBX frame: force the challenge the PBX answered.
    server = ServerLogin({"searchapi": REAL_PASSWORD})
    server.on_challenge_request(AppChallenge())
    server._challenge = REAL_CHALLENGE  # the challenge the PBX saw
    result = server.on_login(real_login())
    assert result.ok is True
    assert server.app == "searchapi"
