// An intercept decider for epsignal-bridge in Node.js (docs/INTERCEPT.md): shows the caller's
// name from a CRM on the phone, and screens blocked numbers. The same behaviour, options and
// output as examples/python/intercept.py.
//
// For each intercepted `setup` the bridge holds, it answers a verdict within the deadline:
// - toward the device (an incoming call) from a number in the CRM file: `forward` with the setup
//   renamed, its `name_identification` facility in `fty` replaced (or one added) with the CRM
//   name; every other field of the setup is sent back as it came, unknown ones included;
// - from a number in the block list (toward the device: the caller `cg`; from the device: the
//   number dialled `cd`): `reject`, cause 21 (call rejected): the phone never rings;
// - anything else: `forward` unchanged.
//
// Run it (the bridge holds setups toward the devices by its configuration,
// EPSIGNAL_INTERCEPT='*=setup:device', or because this program asks, --enable HW):
//
//   npm ci --prefix examples/node
//   node examples/node/intercept.mjs --crm examples/crm.csv --block examples/blocked.txt
//   node examples/node/intercept.mjs --crm examples/crm.csv --enable 009033400001
//
// It declares an exclusive, auto-delete queue bound to `device.*.call.*.intercept` on the events
// exchange: once it is gone nobody is bound, the bridge's requests are unroutable and calls go on
// unchanged at once (fail-open) instead of each waiting for its deadline. Verdicts go to the
// request's `reply_to` with its `correlation_id`; a `traceparent` header is passed back as it
// came (a program with OpenTelemetry would continue the trace with a span of its own instead).
//
// CRM file: CSV `number,name` (a header line `number,name`, lines starting with # skipped; "quoted,
// names" allowed). Block list: one number per line (# starts a comment). Numbers compared as written.
// Options also from the environment: AMQP_URL, EVENTS_EXCHANGE, COMMANDS_EXCHANGE.
import { readFileSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import amqp from "amqplib";

/** @typedef {import("../../contracts/ts/index.js").InterceptRequest} InterceptRequest */
/** @typedef {import("../../contracts/ts/index.js").Verdict} Verdict */
/** @typedef {import("../../contracts/ts/index.js").InterceptCommand} InterceptCommand */
/** @typedef {import("../../contracts/ts/index.js").Reply} Reply */

const REJECTED = 21; // Q.931 cause 21: call rejected
const env = process.env;
const { values: opt } = parseArgs({
  options: {
    "amqp-url": { type: "string", default: env.AMQP_URL ?? "amqp://guest:guest@localhost/" },
    exchange: { type: "string", default: env.EVENTS_EXCHANGE ?? "epsignal.events" },
    "commands-exchange": { type: "string", default: env.COMMANDS_EXCHANGE ?? "epsignal.commands" },
    crm: { type: "string" },
    block: { type: "string" },
    cause: { type: "string", default: String(REJECTED) },
    hw: { type: "string", multiple: true },
    enable: { type: "string", multiple: true },
    count: { type: "string" },
  },
});

// A routing-key word: every byte outside [A-Za-z0-9_-] percent-encoded, as the bridge does.
const word = (/** @type {string} */ id) => [...Buffer.from(id)].map((b) => (/[A-Za-z0-9_-]/.test(String.fromCharCode(b)) ? String.fromCharCode(b) : `%${b.toString(16).toUpperCase().padStart(2, "0")}`)).join("");

/** One CSV line's fields ("quoted" fields may hold commas and "" for a quote). @param {string} line */
function csvFields(line) {
  const out = [];
  const re = /\s*(?:"((?:[^"]|"")*)"|([^,]*))\s*(?:,|$)/gy;
  for (let m; re.lastIndex < line.length && (m = re.exec(line));) {
    out.push(m[1] !== undefined ? m[1].replace(/""/g, '"') : m[2].trim());
  }
  return out;
}

/** @param {string | undefined} path @returns {Map<string, string>} */
function loadCrm(path) {
  const crm = new Map();
  if (!path) return crm;
  let rows = readFileSync(path, "utf8").split(/\r?\n/).filter((l) => l.trim() && !l.trimStart().startsWith("#")).map(csvFields);
  if (rows.length && rows[0].slice(0, 2).map((c) => c.toLowerCase()).join(",") === "number,name") rows = rows.slice(1);
  for (const [num, name] of rows) if (num && name !== undefined) crm.set(num, name);
  return crm;
}

/** @param {string | undefined} path @returns {Set<string>} */
function loadBlocked(path) {
  if (!path) return new Set();
  return new Set(readFileSync(path, "utf8").split(/\r?\n/).map((l) => l.split("#")[0].trim()).filter(Boolean));
}

/** The setup with its name_identification facility naming `name`; the rest as it came.
 * @param {InterceptRequest["sig"]} sig @param {string} name @returns {NonNullable<Verdict["sig"]>} */
function renamed(sig, name) {
  const fty = (sig.fty ?? []).map((f) => ({ ...f }));
  const ni = fty.find((f) => f.type === "name_identification");
  if (ni) ni.name = name;
  else fty.push({ type: "name_identification", name });
  return { ...sig, fty };
}

/** The verdict for one request, and what to print.
 * @param {InterceptRequest} req @param {Map<string, string>} crm @param {Set<string>} blocked @param {number} cause
 * @returns {[Verdict, string]} */
function decide(req, crm, blocked, cause) {
  const { sig, to } = req;
  /** @type {Verdict} */
  const verdict = { v: 1, id: req.id, verdict: "forward" };
  if (sig.type !== "setup") return [verdict, "forward"];
  const number = (to ? sig.cg : sig.cd)?.num;
  if (number !== undefined && blocked.has(number)) return [{ ...verdict, verdict: "reject", cause }, `reject ${number} cause ${cause}`];
  const name = to && number !== undefined ? crm.get(number) : undefined;
  if (name === undefined) return [verdict, `forward ${number}`];
  return [{ ...verdict, sig: renamed(sig, name) }, `rename ${number} ${name}`];
}

/** Ask the bridge to hold the setups toward these devices (an intercept command each).
 * @param {import("amqplib").Channel} ch @param {string[]} hws */
async function enable(ch, hws) {
  /** @type {Map<string, (reply: Reply) => void>} */
  const waiting = new Map();
  const { consumerTag } = await ch.consume("amq.rabbitmq.reply-to", (msg) => {
    if (msg) waiting.get(msg.properties.correlationId)?.(JSON.parse(msg.content.toString()));
  }, { noAck: true });
  /** @type {InterceptCommand} */
  const command = { v: 1, rules: [{ type: "setup", to: true }] };
  const body = Buffer.from(JSON.stringify(command));
  for (const hw of hws) {
    const cid = randomUUID();
    /** @type {Reply} */
    const reply = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no reply to the intercept command for ${hw}`)), 10_000);
      waiting.set(cid, (r) => { clearTimeout(timer); resolve(r); });
      ch.publish(opt["commands-exchange"], `device.${word(hw)}.intercept`, body,
        { replyTo: "amq.rabbitmq.reply-to", correlationId: cid, contentType: "application/json" });
    });
    console.log(`intercept ${hw}: ${reply.ok ? "ok" : reply.error}`);
    if (!reply.ok) process.exit(1);
  }
  await ch.cancel(consumerTag);
}

const crm = loadCrm(opt.crm), blocked = loadBlocked(opt.block);
const cause = Number(opt.cause), count = opt.count ? Number(opt.count) : 0;
const conn = await amqp.connect(opt["amqp-url"]);
const ch = await conn.createChannel();
await ch.assertExchange(opt.exchange, "topic", { durable: true });
const { queue } = await ch.assertQueue("", { exclusive: true, autoDelete: true });
const keys = (opt.hw ?? ["*"]).map((hw) => `device.${hw === "*" ? "*" : word(hw)}.call.*.intercept`);
for (const key of keys) await ch.bindQueue(queue, opt.exchange, key);
if (opt.enable) await enable(ch, opt.enable);
console.log(`deciding on ${keys.join(" ")}: ${crm.size} CRM names, ${blocked.size} blocked`);

let answered = 0;
const stop = async () => { await conn.close(); process.exit(0); };
process.on("SIGINT", stop);
process.on("SIGTERM", stop);
await ch.consume(queue, (msg) => {
  if (!msg) return;
  /** @type {InterceptRequest} */
  const req = JSON.parse(msg.content.toString());
  const [verdict, what] = decide(req, crm, blocked, cause);
  const trace = msg.properties.headers?.traceparent;
  ch.publish("", msg.properties.replyTo, Buffer.from(JSON.stringify(verdict)), {
    correlationId: msg.properties.correlationId, contentType: "application/json",
    headers: trace ? { traceparent: String(trace) } : {},
  });
  console.log(`${req.hw} call ${req.call} ${req.sig.type}: ${what}`);
  if (count && ++answered >= count) stop();
}, { noAck: true });
