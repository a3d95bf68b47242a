// A consumer of epsignal-bridge in Node.js: prints call states, validating each message against
// the published contracts (JSON Schemas, with ajv) and typed with the TypeScript types generated
// from them (contracts/ts/, checked by `npm run typecheck`). Without HW it prints the call states
// of every device; with HW it places a call from that device with a Signaling command (click to
// dial), hangs it up once connected, and ends when the call is released.
//
// Env: AMQP_URL, EVENTS_EXCHANGE, COMMANDS_EXCHANGE (the defaults are the bridge's), HW (the
// device that dials), DIAL (the number, 201), COUNT (without HW: exit after N states, 10),
// TIMEOUT_S (give up after that long, 30: exit code 1; a call placed is hung up first).
// Exit code 2: a message did not match its contract.
import { readFileSync } from "node:fs";
import amqp from "amqplib";
import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";

/** @typedef {import("../../contracts/ts/index.js").CallStateChanged} CallStateChanged */
/** @typedef {import("../../contracts/ts/index.js").SignalingCommand} SignalingCommand */
/** @typedef {import("../../contracts/ts/index.js").Reply} Reply */

const env = process.env;
const ajv = addFormats(new Ajv2020());
/** @param {string} path */
const schema = (path) => ajv.compile(JSON.parse(readFileSync(new URL(`../../contracts/v1/${path}`, import.meta.url), "utf8")));
const valid = {
  state: schema("events/call.state.json"),
  command: schema("commands/signaling.json"),
  reply: schema("reply.json"),
};
// A routing-key word: every byte outside [A-Za-z0-9_-] percent-encoded, as the bridge does.
const word = (/** @type {string} */ id) => [...Buffer.from(id)].map((b) => (/[A-Za-z0-9_-]/.test(String.fromCharCode(b)) ? String.fromCharCode(b) : `%${b.toString(16).toUpperCase().padStart(2, "0")}`)).join("");

const HW = env.HW;
const CALL = -1; // the id of the call we place: negative, a call the application starts
let states = 0, invalid = 0, pendingReplies = 0;
let placed = false, hungUp = false, released = false;
/** @param {keyof typeof valid} kind @param {unknown} body */
function check(kind, body) {
  if (valid[kind](body)) return true;
  invalid++;
  console.log(`INVALID ${kind}: ${ajv.errorsText(valid[kind].errors)}: ${JSON.stringify(body)}`);
  return false;
}

const conn = await amqp.connect(env.AMQP_URL ?? "amqp://guest:guest@localhost/");
const ch = await conn.createChannel();
const commands = env.COMMANDS_EXCHANGE ?? "epsignal.commands";

/** Send a Signaling message for our call toward the PBX; the reply comes by direct reply-to.
 * @param {string} what @param {SignalingCommand["sig"]} sig */
function signal(what, sig) {
  /** @type {SignalingCommand} */
  const cmd = { v: 1, call: CALL, sig };
  check("command", cmd);
  pendingReplies++;
  ch.publish(commands, `device.${word(/** @type {string} */ (HW))}.signaling`, Buffer.from(JSON.stringify(cmd)),
    { replyTo: "amq.rabbitmq.reply-to", correlationId: what, contentType: "application/json" });
}
function hangUp() { // a `rel` with the call's id ends it (cause 16: normal clearing)
  if (!placed || hungUp || released) return false;
  hungUp = true;
  signal("hangup", { type: "rel", cau: { num: 16 } });
  console.log(`hung up call ${CALL} from ${HW}`);
  return true;
}
/** @param {number} code */
const finish = async (code) => {
  if (hangUp()) await new Promise((r) => setTimeout(r, 500)); // never leave the call we placed up
  await conn.close();
  process.exit(code);
};
const timer = setTimeout(() => { console.log(`timeout after ${states} states`); finish(1); }, Number(env.TIMEOUT_S ?? 30) * 1000);
process.once("SIGINT", () => finish(130));
const maybeDone = () => {
  if (HW ? released && !pendingReplies : states >= Number(env.COUNT ?? 10)) { clearTimeout(timer); finish(invalid ? 2 : 0); }
};

// Duplicates are possible (at-least-once): skip an event whose seq is not above the last one
// seen for its (instance, hw). docs/CONSUMERS.md, "Order and duplicates".
/** @type {Map<string, number>} */
const lastSeq = new Map();
/** @param {CallStateChanged} ev */
function duplicate(ev) {
  const key = `${ev.instance}/${ev.hw}`;
  if ((lastSeq.get(key) ?? 0) >= ev.seq) return true;
  lastSeq.set(key, ev.seq);
  return false;
}

const events = env.EVENTS_EXCHANGE ?? "epsignal.events";
await ch.assertExchange(events, "topic", { durable: true });
const { queue } = await ch.assertQueue("", { exclusive: true });
await ch.bindQueue(queue, events, HW ? `device.${word(HW)}.call.*.state` : "device.*.call.*.state");
await ch.consume(queue, (msg) => {
  if (!msg) return; // the queue was deleted
  /** @type {CallStateChanged} */
  const ev = JSON.parse(msg.content.toString());
  if (!check("state", ev) || duplicate(ev)) return;
  console.log(`state ${ev.hw} call ${ev.call} ${ev.state} remote=${ev.remote.num ?? "?"} (${msg.properties.messageId})`);
  states++;
  if (HW && ev.call === CALL) {
    if (ev.state === "connected") hangUp();
    if (ev.state === "released") released = true;
  }
  maybeDone();
}, { noAck: true });

if (HW) { // click to dial: a setup toward the PBX with our call id
  await ch.consume("amq.rabbitmq.reply-to", (msg) => {
    if (!msg) return;
    /** @type {Reply} */
    const reply = JSON.parse(msg.content.toString());
    if (check("reply", reply)) console.log(`reply ${msg.properties.correlationId} ok=${reply.ok} ${reply.error ?? ""}`.trim());
    pendingReplies--;
    if (!reply.ok && msg.properties.correlationId === "dial") released = true; // nothing placed
    maybeDone();
  }, { noAck: true });
  const num = env.DIAL ?? "201";
  signal("dial", { type: "setup", cd: { num } });
  placed = true;
  console.log(`dialled ${num} from ${HW}`);
}
