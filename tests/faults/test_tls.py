"""TLS on both sides: wss:// to the PBX and amqps:// to the broker, against a CA made here.

The simulator and the local RabbitMQ speak plain TCP only, so a small TLS-terminating proxy in
front of them (``asyncio.start_server(ssl=...)`` forwarding the decrypted bytes to the plain
port) plays the TLS server. The certificates are made with the ``cryptography`` package when
it is installed, else with the ``openssl`` command line (the venv has no ``cryptography``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.amqp.link import BrokerLink
from tests.faults.helpers import eventually

pytestmark = pytest.mark.broker


# ------------------------------------------------------------------------------- certificates
@dataclass
class Pki:
    ca: Path
    cert: Path  # for localhost and 127.0.0.1
    key: Path
    other_cert: Path  # valid, same CA, but for pbx.example.net only
    other_key: Path


def _with_cryptography(d: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(k, path):
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("epsignal test CA")).issuer_name(name("epsignal test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(stem, sans):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(stem)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem_key(key, d / f"{stem}.key")

    leaf("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    leaf("other", [x509.DNSName("pbx.example.net")])
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "other.pem", d / "other.key")


def _with_openssl(d: Path) -> Pki:
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=epsignal test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for stem, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("other", "DNS:pbx.example.net")):
        run("req", *ec, "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={stem}")
        (d / f"{stem}.ext").write_text(
            f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n"
            "keyUsage=critical,digitalSignature\nauthorityKeyIdentifier=keyid\n")
        run("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{stem}.pem", "-days", "1", "-extfile", f"{stem}.ext")
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "other.pem", d / "other.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("TLS tests need the 'cryptography' package (not in the venv) or the openssl command "
                        "line (not on PATH) to make a CA and server certificates")
        return _with_openssl(d)
    return _with_cryptography(d)


# ------------------------------------------------------------------------------- a TLS terminator
class TlsProxy:
    """TLS on ``port`` (with ``cert``/``key``), the plain bytes forwarded to ``target``."""

    def __init__(self, cert: Path, key: Path, target: tuple[str, int]) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.target = target
        self.handshakes_ok = 0
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> TlsProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.ctx,
                                                 ssl_handshake_timeout=5)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader, writer) -> None:
        self.handshakes_ok += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        t1 = asyncio.create_task(self._pipe(reader, up_w))
        t2 = asyncio.create_task(self._pipe(up_r, writer))
        self._tasks |= {t1, t2}
        await asyncio.wait({t1, t2}, return_when=asyncio.FIRST_COMPLETED)
        for t in (t1, t2):
            t.cancel()
        for w in (writer, up_w):
            w.transport.abort()
        self._tasks -= {t1, t2}

    @staticmethod
    async def _pipe(r, w) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ssl.SSLError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()

    async def stop(self) -> None:
        self.server.close()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 3)


@pytest.fixture
async def tls_pbx(sim, pki):
    host, port = sim.url.split("//")[1].split("/")[0].split(":")
    proxy = await TlsProxy(pki.cert, pki.key, (host, int(port))).start()
    yield proxy
    await proxy.stop()


def wss(port: int, host: str = "localhost") -> str:
    return f"wss://{host}:{port}/PBX0/APPS/websocket"


def pbx_log(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "bridge.pbx")


# ------------------------------------------------------------------------------- wss://
async def test_wss_with_an_untrusted_certificate_is_refused_clearly(
        sim, tls_pbx, bus, settings_for, start_bridge, caplog):
    caplog.set_level(logging.WARNING, logger="bridge.pbx")
    hw = sim.hw(1)
    bridge = await start_bridge(settings_for(sim, pbx_url=wss(tls_pbx.port), devices=hw))
    await eventually(lambda: "certificate verify failed" in pbx_log(caplog), 10, "the verify failure logged")
    await asyncio.sleep(1.0)
    assert sim.stats()["attached_devices"] == 0 and sim.stats()["logins_ok"] == 0
    assert tls_pbx.handshakes_ok == 0
    text = pbx_log(caplog)
    assert "SSLCertVerificationError" in text and hw in text, text
    assert bridge.pbx.runners[hw].session is None
    reasons = bridge.not_ready_reasons()  # readiness names the cause and the setting to fix
    assert len(reasons) == 1 and reasons[0].startswith("PBX not reachable: no session is up"), reasons
    assert "not trusted" in reasons[0] and "EPSIGNAL_PBX_CA_FILE" in reasons[0], reasons


async def test_wss_with_the_ca_configured_attaches_and_calls_complete(
        sim, tls_pbx, pki, bus, settings_for, start_bridge):
    hw = sim.hw(2)
    q = await bus.bind(f"device.{hw}.#")
    bridge = await start_bridge(settings_for(sim, pbx_url=wss(tls_pbx.port), pbx_ca_file=str(pki.ca), devices=hw))
    await q.until(lambda e: e.body["type"] == "attached")
    assert bridge.pbx._ssl.verify_mode == ssl.CERT_REQUIRED and bridge.pbx._ssl.check_hostname
    call = await sim.place_call(hw, direction="in", hold_s=0.1)
    await q.until(lambda e: e.body["type"] == "call.state" and e.body["call"] == call and e.body["state"] == "released")
    assert sim.stats()["calls_stalled"] == 0 and tls_pbx.handshakes_ok >= 1


async def test_wss_host_name_is_checked_against_the_certificate(sim, pki, bus, settings_for, start_bridge, caplog):
    caplog.set_level(logging.WARNING, logger="bridge.pbx")
    host, port = sim.url.split("//")[1].split("/")[0].split(":")
    proxy = await TlsProxy(pki.other_cert, pki.other_key, (host, int(port))).start()  # for pbx.example.net
    try:
        hw = sim.hw(4)
        await start_bridge(settings_for(sim, pbx_url=wss(proxy.port), pbx_ca_file=str(pki.ca), devices=hw))
        await eventually(lambda: "certificate verify failed" in pbx_log(caplog), 10, "the failure logged")
        assert "Hostname mismatch" in pbx_log(caplog) or "IP address mismatch" in pbx_log(caplog), pbx_log(caplog)
        assert sim.stats()["attached_devices"] == 0
    finally:
        await proxy.stop()


async def test_wss_verification_can_be_turned_off_explicitly(sim, tls_pbx, bus, settings_for, start_bridge):
    hw = sim.hw(5)
    bridge = await start_bridge(settings_for(sim, pbx_url=wss(tls_pbx.port), pbx_tls_verify=False, devices=hw))
    await eventually(lambda: bridge.pbx.runners[hw].device.attached, 10, "attached without verification")
    assert bridge.pbx._ssl.verify_mode == ssl.CERT_NONE


# ------------------------------------------------------------------------------- amqps://
def _ca_subjects(ctx: ssl.SSLContext) -> list[str]:
    return [v for c in ctx.get_ca_certs() for rdn in c["subject"] for k, v in rdn if k == "commonName"]


async def test_amqps_builds_a_verifying_context_and_loads_the_ca_file(pki, settings_for):
    plain = BrokerLink(settings_for(None))
    assert plain._ssl is None
    system = BrokerLink(settings_for(None, amqp_url="amqps://guest:guest@localhost/"))
    assert system._ssl.verify_mode == ssl.CERT_REQUIRED and system._ssl.check_hostname is True
    assert "epsignal test CA" not in _ca_subjects(system._ssl)
    own = BrokerLink(settings_for(None, amqp_url="amqps://guest:guest@localhost/", amqp_ca_file=str(pki.ca)))
    assert own._ssl.verify_mode == ssl.CERT_REQUIRED and own._ssl.check_hostname is True
    assert "epsignal test CA" in _ca_subjects(own._ssl)
    assert own._ssl.minimum_version >= ssl.TLSVersion.TLSv1_2


async def test_amqps_to_an_untrusted_certificate_fails_and_with_the_ca_connects(pki, bus, settings_for, caplog):
    caplog.set_level(logging.WARNING, logger="bridge.amqp")
    proxy = await TlsProxy(pki.cert, pki.key, ("127.0.0.1", 5672)).start()
    links = []
    try:
        url = f"amqps://guest:guest@localhost:{proxy.port}/"
        bad = BrokerLink(settings_for(None, amqp_url=url))
        links.append(bad)
        task = asyncio.create_task(bad.run())
        await eventually(lambda: "certificate verify failed" in caplog.text, 10, "the verify failure logged")
        assert not bad.ready and proxy.handshakes_ok == 0
        line = next(r.getMessage() for r in caplog.records
                    if r.name == "bridge.amqp" and "certificate verify failed" in r.getMessage())
        assert "unreachable" in line and "guest:guest" not in line, line
        await bad.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

        good = BrokerLink(settings_for(None, amqp_url=url, amqp_ca_file=str(pki.ca)))
        links.append(good)
        task = asyncio.create_task(good.run())
        assert await good.wait_ready(10), caplog.text
        assert proxy.handshakes_ok >= 1
        await good.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        for link in links:
            await link.close()
        await proxy.stop()
