// A consumer of epsignal-bridge in Node.js: prints every call state of every device, validating
// each message against the published contracts, and (with HW set) places a call from that device
// with a Signaling command (click to dial).
//
// Env: AMQP_URL, EVENTS_EXCHANGE, COMMANDS_EXCHANGE (the defaults are the bridge's), HW (the
// device that dials), DIAL (the number, 201), COUNT (exit after N states, 10), TIMEOUT_S (or
// give up after that long, exit code 1). Exit code 2: a message did not match its contract.
import { readFileSync } from "node:fs";
import amqp from "amqplib";
import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";

const env = process.env;
const ajv = addFormats(new Ajv2020());
const schema = (path) => ajv.compile(JSON.parse(readFileSync(new URL(`../../contracts/v1/${path}`, import.meta.url))));
const valid = { state: schema("events/call.state.json"), command: schema("commands/signaling.json"), reply: schema("reply.json") };
// A routing-key word: every byte outside [A-Za-z0-9_-] percent-encoded, as the bridge does.
const word = (id) => [...Buffer.from(id)].map((b) => (/[A-Za-z0-9_-]/.test(String.fromCharCode(b)) ? String.fromCharCode(b) : `%${b.toString(16).toUpperCase().padStart(2, "0")}`)).join("");

let states = 0, invalid = 0, replied = !env.HW;
function check(kind, body) {
  if (valid[kind](body)) return true;
  invalid++;
  console.log(`INVALID ${kind}: ${ajv.errorsText(valid[kind].errors)}: ${JSON.stringify(body)}`);
  return false;
}

const conn = await amqp.connect(env.AMQP_URL ?? "amqp://guest:guest@localhost/");
const ch = await conn.createChannel();
const finish = async (code) => { await conn.close(); process.exit(code); };
const timer = setTimeout(() => { console.log(`timeout after ${states} states`); finish(1); }, Number(env.TIMEOUT_S ?? 30) * 1000);
const maybeDone = () => { if (states >= Number(env.COUNT ?? 10) && replied) { clearTimeout(timer); finish(invalid ? 2 : 0); } };

const events = env.EVENTS_EXCHANGE ?? "epsignal.events";
await ch.assertExchange(events, "topic", { durable: true });
const { queue } = await ch.assertQueue("", { exclusive: true });
await ch.bindQueue(queue, events, "device.*.call.*.state");
await ch.consume(queue, (msg) => {
  const ev = JSON.parse(msg.content);
  if (check("state", ev)) console.log(`state ${ev.hw} call ${ev.call} ${ev.state} remote=${ev.remote.num ?? "?"} (${msg.properties.messageId})`);
  states++;
  maybeDone();
}, { noAck: true });

if (env.HW) { // click to dial: a setup toward the PBX with call -1; the reply comes by direct reply-to
  const cmd = { v: 1, call: -1, sig: { type: "setup", cd: { num: env.DIAL ?? "201" } } };
  check("command", cmd);
  await ch.consume("amq.rabbitmq.reply-to", (msg) => {
    const reply = JSON.parse(msg.content);
    if (check("reply", reply)) console.log(`reply ok=${reply.ok} ${reply.error ?? ""}`.trim());
    replied = true;
    maybeDone();
  }, { noAck: true });
  ch.publish(env.COMMANDS_EXCHANGE ?? "epsignal.commands", `device.${word(env.HW)}.signaling`,
    Buffer.from(JSON.stringify(cmd)), { replyTo: "amq.rabbitmq.reply-to", correlationId: "node-1", contentType: "application/json" });
  console.log(`dialled ${cmd.sig.cd.num} from ${env.HW}`);
}
