"""Loading the committed contracts and validating against them (Draft 2020-12)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from bridge import contracts as C

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ROOT / "contracts"
NODE_DIR = ROOT / "examples" / "node"

# jsonschema checks date-time only with an optional package: check RFC 3339 here
FORMATS = FormatChecker()
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", re.I)


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.fullmatch(value):
        return False
    datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    return True


@cache
def schema(path: str) -> dict:
    return json.loads((CONTRACTS / path).read_text())


def validator(path: str) -> Draft202012Validator:
    return Draft202012Validator(schema(path), format_checker=FORMATS)


def errors(path: str, instance: object) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator(path).iter_errors(instance)
    ]


def body_path(kind: str, name: str) -> str:
    return next(b.path for b in C.BODIES if b.kind == kind and b.name == name)


@cache
def asyncapi() -> dict:
    return json.loads((CONTRACTS / "asyncapi.json").read_text())


def asyncapi_errors(component: str, instance: object) -> list[str]:
    """Validate against ``#/components/schemas/<component>`` of the AsyncAPI document."""
    doc = asyncapi()
    uri = "urn:test:asyncapi"
    registry = Registry().with_resource(
        uri, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    v = Draft202012Validator(
        {"$ref": f"{uri}#/components/schemas/{component}"},
        registry=registry,
        format_checker=FORMATS,
    )
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in v.iter_errors(instance)
    ]


def channel_regex(address: str) -> re.Pattern:
    """A routing-key pattern of the AsyncAPI document as a regex for concrete keys."""
    words = {
        "hw": r"[A-Za-z0-9_%-]+",
        "instance": r"[A-Za-z0-9_%-]+",
        "call": r"-?[0-9]+",
        "key": r".*",
    }
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", address):
        out += re.escape(address[pos : m.start()]) + f"(?P<{m[1]}>{words[m[1]]})"
        pos = m.end()
    return re.compile(out + re.escape(address[pos:]))


def event_channel(event_type: str) -> dict:
    """The AsyncAPI channel that carries an event type."""
    doc = asyncapi()
    for ch in doc["channels"].values():
        for ref in ch["messages"].values():
            msg = doc["components"]["messages"][ref["$ref"].rsplit("/", 1)[1]]
            if msg["name"] == event_type:
                return ch
    raise KeyError(event_type)


def node_ready() -> str:
    """The node binary, with the example's packages installed (scripts/test does that)."""
    node = shutil.which("node")
    assert node, "Node.js is needed for the contract tests (scripts/test installs its packages)"
    assert (NODE_DIR / "node_modules" / "@asyncapi" / "parser").is_dir(), (
        "examples/node/node_modules is missing: run scripts/test, or "
        "npm ci --no-audit --no-fund --prefix examples/node"
    )
    return node


def run_node(
    *args: str, timeout: float = 60, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [node_ready(), *args],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
