// Validates an AsyncAPI document with the official parser (@asyncapi/parser): prints every
// diagnostic and exits 1 on any error or warning. Usage: node check-asyncapi.mjs [file]
// (default: contracts/asyncapi.json).
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { Parser, DiagnosticSeverity } from "@asyncapi/parser";

const file = process.argv[2] ?? fileURLToPath(new URL("../../contracts/asyncapi.json", import.meta.url));
const { document, diagnostics } = await new Parser().parse(readFileSync(file, "utf8"), { source: file });
const severity = ["error", "warning", "info", "hint"];
for (const d of diagnostics) {
  console.log(`${severity[d.severity]} ${d.code} at ${d.path.join("/") || "(root)"}: ${d.message}`);
}
const bad = diagnostics.filter((d) => d.severity <= DiagnosticSeverity.Warning);
if (!document || bad.length) process.exit(1);
console.log(`ok: AsyncAPI ${document.version()}, ${document.channels().length} channels, ` +
  `${document.operations().length} operations, ${document.messages().length} messages`);
