"""Seeded generators of PBX frames and bus commands for the fuzz tests.

Hypothesis drives the small property tests of the codec (tests/unit); here the counts are in
the hundred thousands against one long-lived session and one running consumer. Measured on the
2-core CI machine, Hypothesis generates about 500 JSON-ish examples a second (3.4 minutes for
100,000, before any shrinking, which is useless against a live process anyway); this seeded
``random.Random`` makes the 105,000 frames in about 3.5 s. The same seed
(``EPSIGNAL_FUZZ_SEED``) gives the same corpus, so a failure is reproducible.

Frames come in three classes, decided by construction (not by asking the bridge):

- ``bad``: malformed, the bridge must count it as a bad frame and not forward it;
- ``fwd``: a Signaling message with ``call >= 0`` (odd but well-formed: extra fields, odd
  whitespace and field order, big numbers, unknown sig types, sigs the bridge cannot read,
  invalid UTF-8 *inside* the sig, deep nesting inside the sig): forwarded byte for byte;
- ``app``: a Signaling message with a negative call id: published, never forwarded.
"""

from __future__ import annotations

import json
import os
import random

SEED = int(os.environ.get("EPSIGNAL_FUZZ_SEED", "20261126"))

KNOWN_MT = ("AppChallenge", "AppChallengeResult", "AppLogin", "AppLoginResult", "Attach",
            "AttachResult", "Attached", "Detached", "Sync", "Signaling")
SIG_TYPES = ("setup", "setup_ack", "call_proc", "alert", "conn", "conn_ack", "disc", "rel",
             "facility", "info", "progress", "dtmf", "xyzzy", "")
#: the deepest nesting used in the main fuzz run; deeper frames are a separate (xfail) test
SAFE_DEPTH = 300


class FrameGen:
    def __init__(self, seed: int, hw: str, max_bytes: int) -> None:
        self.r = random.Random(seed)
        self.hw = hw
        self.max_bytes = max_bytes
        self._bad = [
            self.not_json, self.truncated, self.trailing, self.syntax, self.bad_utf8_outside_sig,
            self.not_object, self.unknown_mt, self.wrong_type, self.sig_not_object, self.missing,
            self.huge_number_bad, self.deep_bad, self.control_char, self.other_message_bad,
        ]

    # ------------------------------------------------------------------ pieces
    def text(self, n: int = 12) -> str:
        r = self.r
        alphabet = "abcXYZ019 _-:.#*/\\\"'äöüé€😀\t\n\u2028"
        return "".join(r.choice(alphabet) for _ in range(r.randint(0, n)))

    def jstr(self, n: int = 12) -> bytes:
        return json.dumps(self.text(n), ensure_ascii=self.r.random() < 0.5).encode()

    def ws(self) -> bytes:
        return self.r.choice((b"", b"", b"", b" ", b"\n", b"\t", b"\r\n  "))

    def value(self, depth: int = 0) -> bytes:
        """Any JSON value (valid UTF-8, valid JSON)."""
        r = self.r
        k = r.randrange(9 if depth < 3 else 6)
        if k == 0:
            return str(r.randint(-10**6, 10**6)).encode()
        if k == 1:
            return repr(r.uniform(-1e6, 1e6)).encode()
        if k == 2:
            return self.jstr()
        if k == 3:
            return r.choice((b"true", b"false", b"null"))
        if k == 4:
            return str(r.randint(10**18, 10**40)).encode()  # bigger than int64
        if k == 5:
            return r.choice((b"1e308", b"-1e308", b"1.7976931348623157e308", b"5e-324", b"0.0"))
        if k == 6:
            return b"[" + b",".join(self.value(depth + 1) for _ in range(r.randint(0, 3))) + b"]"
        return self.obj(depth + 1)

    def obj(self, depth: int = 0, fields: list[tuple[bytes, bytes]] | None = None) -> bytes:
        r = self.r
        items = list(fields or [])
        for _ in range(r.randint(0, 3)):
            items.append((self.jstr(6), self.value(depth)))
        r.shuffle(items)
        return b"{" + b",".join(self.ws() + k + self.ws() + b":" + self.ws() + v for k, v in items) + b"}"

    def sig(self) -> bytes:
        """A sig object: sometimes readable, sometimes not (wrong inner types), always an object."""
        r = self.r
        fields = []
        if r.random() < 0.97:
            fields.append((b'"type"', json.dumps(r.choice(SIG_TYPES)).encode()))
        if r.random() < 0.3:
            fields.append((b'"cg"', self.obj(1, [(b'"num"', self.jstr(4))])))
        if r.random() < 0.3:
            fields.append((b'"cd"', self.obj(1, [(b'"sip"', self.jstr(4))])))
        if r.random() < 0.2:
            fields.append((b'"cau"', b'{"num":%d}' % r.choice((16, 17, 31, 102))))
        if r.random() < 0.05:  # readable by nobody: the bridge forwards it anyway
            fields.append((r.choice((b'"cg"', b'"cau"', b'"channel"', b'"fty"')), r.choice((b"5", b'"x"', b"[1]"))))
        if r.random() < 0.02:  # invalid UTF-8 inside a string of the sig: passed through untouched
            fields.append((b'"dn"', b'"\xff\xfe\xc3"'))
        if r.random() < 0.01:
            d = r.randint(10, SAFE_DEPTH)
            fields.append((b'"deep"', b"[" * d + b"]" * d))
        return self.obj(1, fields)

    def signaling(self, call: int, sig: bytes | None = None, *, extra: bool = True) -> bytes:
        r = self.r
        fields = [(b'"mt"', b'"Signaling"'), (b'"call"', str(call).encode()), (b'"sig"', sig or self.sig())]
        if r.random() < 0.9:
            fields.append((b'"api"', b'"EpSignal"'))
        x = r.random()
        if x < 0.5:
            fields.append((b'"src"', json.dumps(self.hw).encode()))
        elif x < 0.6:
            fields.append((b'"src"', self.jstr(8)))
        y = r.random()
        if y < 0.4:
            fields.append((b'"to"', b"true"))
        elif y < 0.5:
            fields.append((b'"to"', b"false"))
        if extra and r.random() < 0.1:
            fields.append((b'"x-unknown"', self.value()))
        r.shuffle(fields)
        return self.ws() + b"{" + b",".join(self.ws() + k + self.ws() + b":" + self.ws() + v
                                            for k, v in fields) + b"}" + self.ws()

    # ------------------------------------------------------------------ the good ones
    def forwarded(self) -> bytes:
        r = self.r
        call = r.randint(0, 2**31) if r.random() < 0.95 else r.randint(2**63, 10**30)
        return self.signaling(call)

    def app_call(self) -> bytes:
        return self.signaling(-self.r.randint(1, 2**31))

    # ------------------------------------------------------------------ the bad ones
    def bad(self) -> bytes:
        return self.r.choice(self._bad)()

    def not_json(self) -> bytes:
        r = self.r
        start = r.choice((b"}", b"]", b"x", b":", b",", b"\x00", b"\xff", b"'", b"NaN", b"-", b"+1"))
        return start + bytes(r.getrandbits(8) for _ in range(r.randint(0, 60)))

    def truncated(self) -> bytes:
        f = self.signaling(self.r.randint(0, 1000)).strip()
        return f[: self.r.randrange(len(f) - 1)]  # a strict prefix of an object: never complete

    def trailing(self) -> bytes:
        return self.signaling(1).strip() + self.r.choice((b"}", b"x", b",", b"{}", b"]", b"\x00", b" 1"))

    def syntax(self) -> bytes:
        return self.r.choice((
            b"{'mt':'Signaling','call':1,'sig':{}}",
            b'{"mt":"Signaling","call":NaN,"sig":{}}',
            b'{"mt":"Signaling","call":Infinity,"sig":{}}',
            b'{"mt":"Signaling","call":1,"sig":{},}',
            b'{"mt":"Signaling" "call":1,"sig":{}}',
            b'{"mt":"Signaling","call":01,"sig":{}}',
            b'{"mt":"Signaling","call":1,"sig":{"type":"alert",}}',
            b'{"mt":"Signaling","call":1,"sig":{"type":alert}}',
            b'{mt:"Signaling"}',
            b'{"mt":"Signaling","call":1,"sig":{"type":"\\x41"}}',
            b'{"mt":"Signaling","call":.5,"sig":{}}',
            b"",
            b"   ",
        ))

    def bad_utf8_outside_sig(self) -> bytes:
        r = self.r
        junk = r.choice((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80abc"))
        where = r.randrange(3)
        if where == 0:
            return b'{"api":"EpSignal","mt":"Signal' + junk + b'ing","call":1,"sig":{}}'
        if where == 1:
            return b'{"api":"EpSignal","mt":"Signaling","src":"' + junk + b'","call":1,"sig":{}}'
        return junk + self.signaling(1)

    def not_object(self) -> bytes:
        r = self.r
        k = r.randrange(5)
        if k == 0:
            return b"[" + self.signaling(1) + b"]"
        if k == 1:
            return json.dumps(self.signaling(2).decode("utf-8", "replace")).encode()
        if k == 2:
            return r.choice((b"null", b"true", b"false", b"0", b"-1", b"1e400", b"[]", b'""'))
        if k == 3:
            return str(r.randint(-10**30, 10**30)).encode()
        return self.jstr(20)

    def unknown_mt(self) -> bytes:
        r = self.r
        mt = r.choice(("Foo", "signaling", "SIGNALING", "Signaling ", " Signaling", "Detach",
                       "Signalling", "", "Attach\u0000", "Sïgnaling", "X" + self.text(8)))
        if mt in KNOWN_MT:
            mt = "Unknown" + mt
        return self.obj(0, [(b'"mt"', json.dumps(mt).encode()), (b'"api"', b'"EpSignal"'),
                            (b'"call"', b"1"), (b'"sig"', self.sig())])

    def wrong_type(self) -> bytes:
        r = self.r
        field = r.choice(("call", "to", "src", "api", "mt"))
        bad = {
            "call": (b'"17"', b"1.5", b"true", b"null", b"{}", b"[1]", b'""', b"-0.5", b"1e400", b"2E3"),
            "to": (b'"true"', b"1", b"0", b"null", b"{}", b"[]"),
            "src": (b"42", b"null", b"true", b"{}", b'["a"]', b"1.0"),
            "api": (b'"Api"', b'"epsignal"', b"1", b"null", b'""'),
            "mt": (b"7", b"null", b"true", b'["Signaling"]', b"{}"),
        }[field]
        fields = {b'"mt"': b'"Signaling"', b'"call"': b"1", b'"sig"': self.sig()}
        fields[b'"' + field.encode() + b'"'] = r.choice(bad)
        return self.obj(0, list(fields.items()))

    def sig_not_object(self) -> bytes:
        sig = self.r.choice((b'"rel"', b"5", b"[]", b'[{"type":"rel"}]', b"null", b"true", b"1e400",
                             b'"{\\"type\\":\\"alert\\"}"'))
        return self.signaling(self.r.randint(0, 10**6), sig)

    def missing(self) -> bytes:
        r = self.r
        which = r.randrange(3)
        fields = [(b'"mt"', b'"Signaling"'), (b'"call"', b"3"), (b'"sig"', self.sig())]
        del fields[which]
        if which == 0:  # without mt: still say "Signaling" somewhere it does not count
            fields.append((b'"type"', b'"Signaling"'))
        return self.obj(0, fields)

    def huge_number_bad(self) -> bytes:
        r = self.r
        num = r.choice((b"1e400", b"-1e400", b"9" * 400 + b".5", b"1" + b"0" * 30 + b".0", b"123456789e999"))
        return self.obj(0, [(b'"mt"', b'"Signaling"'), (b'"call"', num), (b'"sig"', self.sig())])

    def deep_bad(self) -> bytes:
        r = self.r
        d = r.randint(50, SAFE_DEPTH)
        k = r.randrange(4)
        if k == 0:
            return b"[" * d + b"]" * d
        if k == 1:
            return b'{"mt":"Signaling","sig":{},"call":' + b"[" * d + b"]" * d + b"}"
        if k == 2:
            return b'{"mt":"Signaling","call":1,"sig":' + b'{"a":' * d + b"1" + b"}" * d  # unclosed
        return b'{"mt":' + b'{"a":' * d + b"1" + b"}" * d + b"}"

    def control_char(self) -> bytes:
        c = bytes([self.r.choice([0, 1, 8, 10, 13, 27, 31])])
        return b'{"mt":"Signaling","call":1,"sig":{"type":"al' + c + b'ert"}}'

    def other_message_bad(self) -> bytes:
        return self.r.choice((
            b'{"api":"EpSignal","mt":"Sync","call":1,"info":"not an object"}',
            b'{"api":"EpSignal","mt":"Sync","call":"1","info":{}}',
            b'{"api":"EpSignal","mt":"Sync","call":1,"info":{"state":"bogus"}}',
            b'{"api":"EpSignal","mt":"Sync","call":1,"info":{"in":"yes"}}',
            b'{"api":"EpSignal","mt":"Attached","src":42}',
            b'{"api":"EpSignal","mt":"Detached","src":["x"]}',
            b'{"api":"EpSignal","mt":"AttachResult","stun":["a","b"]}',
            b'{"api":"EpSignal","mt":"AttachResult","turnPwd":7}',
            b'{"mt":"AppLoginResult","ok":"yes"}',
            b'{"mt":"AppChallengeResult","challenge":5}',
            b'{"api":"EpSignal","mt":"Attach"}',
        ))

    def overlong_bad(self, size: int) -> bytes:
        """A malformed frame of about ``size`` bytes (a huge string where a number belongs)."""
        pad = size - 60
        return b'{"mt":"Signaling","sig":{},"call":"' + b"9" * pad + b'"}'


class CommandGen:
    """Bad commands for the consumer: (routing key, body, headers)."""

    def __init__(self, seed: int, attached_hw: str) -> None:
        self.r = random.Random(seed)
        self.attached = attached_hw
        self.kinds = [
            (self.bad_json, 20), (self.wrong_types, 20), (self.unknown_verb, 10), (self.bad_key, 15),
            (self.not_attached, 23), (self.bad_sig, 9), (self.huge_body, 1), (self.unknown_device, 2),
        ]
        self._pool = [k for k, w in self.kinds for _ in range(w)]

    def hw(self) -> str:
        r = self.r
        return r.choice(("009033409999", "nosuchdevice", f"dev{r.randrange(1000)}", "x" * r.randint(1, 40)))

    def next(self) -> tuple[str, bytes, str]:
        f = self.r.choice(self._pool)
        key, body = f()
        return key, body, f.__name__

    def bad_json(self):
        r = self.r
        verb = r.choice(("attach", "detach", "signaling"))
        body = r.choice((b"{nope", b"[", b"{'call':1}", b'{"call":1,', b"\xff\xfe", b"NaN", b'{"call":1}}'))
        return f"device.{self.hw()}.{verb}", body

    def wrong_types(self):
        r = self.r
        verb = r.choice(("attach", "detach", "signaling", "signaling", "signaling"))
        if verb == "signaling":
            body = r.choice((b'{"call":"x","sig":{"type":"setup"}}', b'{"call":1,"sig":5}',
                             b'{"call":1.5,"sig":{"type":"setup"}}', b'{"sig":{"type":"setup"}}',
                             b'{"call":1}', b'{"call":1,"to":"yes","sig":{"type":"setup"}}',
                             b"[]", b"null", b"5",
                             b'{"call":1e400,"sig":{"type":"setup"}}'))
        else:
            body = r.choice((b'{"v":"one"}', b"[]", b"5", b'"attach"', b"null", b'{"v":1.5}'))
        return f"device.{self.hw()}.{verb}", body

    def unknown_verb(self):
        verb = self.r.choice(("explode", "Attach", "ATTACH", "dial", "detach2", "signalling", "x" * 50))
        return f"device.{self.hw()}.{verb}", b"{}"

    def bad_key(self):
        r = self.r
        key = r.choice(("", "device", "device.", "device..attach", "totally.wrong", "a.b.c.d.e",
                        f"device.{self.attached}", f"device.{self.attached}.attach.now",
                        f"devices.{self.attached}.attach", "#", "*.*.*", "device.%FF.attach", "x" * 255,
                        f"device.{self.attached}.signaling.", ".device.x.attach"))
        return key, r.choice((b"{}", b"", b'{"call":1,"sig":{"type":"setup"}}'))

    def unknown_device(self):
        """Attach commands for devices the PBX does not know (refused by the PBX) or with hw ids
        that are not valid (``%zz``, ``a b``, non-ASCII: refused by the bridge, bridge/ids.py)."""
        hw = self.r.choice(("%zz", "a b", f"nosuch{self.r.randrange(100)}", "ünïcödé"))
        return f"device.{hw}.attach", b""

    def not_attached(self):
        call = -self.r.randint(1, 10**6)
        return (f"device.{self.hw()}.signaling",
                b'{"call":%d,"sig":{"type":"setup","cd":{"num":"201"}}}' % call)

    def bad_sig(self):
        sig = self.r.choice((b"{}", b'{"type":5}', b'{"type":"setup","cg":5}', b'{"type":"rel","cau":"x"}',
                             b'{"type":"setup","fty":{}}', b'{"type":"setup","channel":"a"}'))
        return f"device.{self.attached}.signaling", b'{"call":-1,"sig":%s}' % sig

    def huge_body(self):
        n = self.r.randint(65 * 1024, 256 * 1024)
        verb = self.r.choice(("attach", "signaling"))
        return f"device.{self.hw()}.{verb}", b'{"pad":"' + b"a" * n + b'"}'
