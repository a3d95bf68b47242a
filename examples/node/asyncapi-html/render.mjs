// Renders an AsyncAPI document as browsable HTML with AsyncAPI's generator and its HTML template
// (the packages pinned here). Usage: node render.mjs ASYNCAPI_FILE OUT_DIR; scripts/contracts-docs
// runs it for contracts/asyncapi.json. One self-contained index.html (scripts and styles inline).
import { createRequire } from "node:module";
import { dirname, resolve } from "node:path";

const require = createRequire(import.meta.url);
const Generator = require("@asyncapi/generator");
const [file, out] = process.argv.slice(2).map((p) => resolve(p));
if (!file || !out) {
  console.error("usage: node render.mjs ASYNCAPI_FILE OUT_DIR");
  process.exit(2);
}
const template = dirname(require.resolve("@asyncapi/html-template/package.json"));
const generator = new Generator(template, out, {
  forceWrite: true,
  templateParams: { singleFile: "true", outFilename: "index.html" },
});
await generator.generateFromFile(file);
console.log(`${out}/index.html`);
