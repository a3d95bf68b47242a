"""The TypeScript types in contracts/ts/ are what json-schema-to-typescript (pinned in
examples/node) makes of the JSON Schemas, and the Node example type-checks against them."""

from __future__ import annotations

import json
import shutil

from .helpers import CONTRACTS, NODE_DIR, run_node

TS = CONTRACTS / "ts"
REGENERATE = "run `npm run types --prefix examples/node` (after `epsignal-bridge contracts`)"


def files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def generate(out, contracts=CONTRACTS) -> dict[str, bytes]:
    r = run_node("gen-types.mjs", str(out), str(contracts))
    assert r.returncode == 0, r.stdout + r.stderr
    return files(out)


def test_committed_types_are_what_the_schemas_generate(tmp_path):
    made, have = generate(tmp_path / "ts"), files(TS)
    assert sorted(have) == sorted(made), f"contracts/ts/ has other files; {REGENERATE}"
    stale = [rel for rel in made if have[rel] != made[rel]]
    assert not stale, f"contracts/ts/ is stale ({', '.join(stale)}); {REGENERATE}"
    # one .d.ts per schema, and an index naming every body
    schemas = sorted(p.relative_to(CONTRACTS / "v1").as_posix()
                     for p in (CONTRACTS / "v1").rglob("*.json"))
    assert sorted(made) == sorted(["index.d.ts"] + [
        f"v1/{s.removesuffix('.json')}.d.ts" for s in schemas])
    index = made["index.d.ts"].decode()
    for s in schemas:
        title = json.loads((CONTRACTS / "v1" / s).read_text())["title"]
        assert f" {title}" in index, title
    assert "export type Event = " in index and "export type Command = " in index


def test_a_changed_schema_changes_the_types(tmp_path):
    # the comparison above bites: a new call state and a new field show in the generated types
    src = tmp_path / "contracts"
    shutil.copytree(CONTRACTS / "v1", src / "v1")
    p = src / "v1/events/call.state.json"
    s = json.loads(p.read_text())
    s["$defs"]["CallState"]["enum"].append("ringing")
    s["properties"]["line"] = {"description": "A new field.", "type": "string"}
    p.write_text(json.dumps(s))
    made = generate(tmp_path / "ts", src)
    assert made["v1/events/call.state.d.ts"] != files(TS)["v1/events/call.state.d.ts"]
    text = made["v1/events/call.state.d.ts"].decode()
    assert '| "ringing"' in text and "line?: string;" in text


def test_generated_types_read_as_the_schemas_say():
    state = (TS / "v1/events/call.state.d.ts").read_text()
    assert "state: CallState;" in state and "cause: Cause | null;" in state
    assert "export type CallState =" in state and '| "released"' in state
    assert "loc?: unknown;" in state  # untyped in the schema: unknown, not an object
    assert "[k: string]: unknown;" in state  # events may carry fields added later
    sig = (TS / "v1/commands/signaling.d.ts").read_text()
    assert "call: number;" in sig and "sig: Sig;" in sig and "to?: boolean;" in sig


def test_the_node_example_type_checks_and_the_types_catch_mistakes(tmp_path):
    # one tsc run (~4 s): the example as `npm run typecheck` checks it, with no error, and a file
    # with a wrong call state and a wrong command field, with exactly those two errors
    index = (TS / "index.js").as_posix()  # index.d.ts, as a module specifier
    (tmp_path / "bad.mjs").write_text(
        f'/** @type {{import("{index}").CallStateChanged}} */\n'
        'const ev = JSON.parse("{}");\n'
        'if (ev.state === "ringing") console.log(ev.remote.num);\n'
        f'/** @type {{import("{index}").SignalingCommand}} */\n'
        'export const cmd = { call: -1, sig: { type: "rel", cau: { num: "16" } } };\n'
    )
    example = json.loads((NODE_DIR / "tsconfig.json").read_text())
    (tmp_path / "tsconfig.json").write_text(json.dumps({
        "extends": (NODE_DIR / "tsconfig.json").as_posix(),
        "compilerOptions": {"typeRoots": [(NODE_DIR / "node_modules/@types").as_posix()]},
        "files": [(NODE_DIR / f).as_posix() for f in example["files"]] + ["bad.mjs"],
    }))
    assert "consumer.mjs" in example["files"]
    r = run_node(str(NODE_DIR / "node_modules/typescript/bin/tsc"), "-p",
                 str(tmp_path / "tsconfig.json"))
    errors = [line for line in r.stdout.splitlines() if ": error TS" in line]
    assert r.returncode == 2 and len(errors) == 2, r.stdout + r.stderr
    assert "bad.mjs(3," in errors[0] and "'CallState' and '\"ringing\"'" in errors[0]
    assert "bad.mjs(5," in errors[1] and "'string' is not assignable to type 'number'" in errors[1]
