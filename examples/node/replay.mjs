// Replay the bridge's events from a RabbitMQ stream, as examples/python/replay.py does (the same
// options, the same output): a consumer that starts late reads the last hours of call events,
// then follows the live ones (docs/CONSUMERS.md, "Replaying events from a stream").
//
//   node replay.mjs --declare            # once, before the events you want kept
//   node replay.mjs --from first         # everything the stream still holds
//   node replay.mjs --from 1h            # the last hour
//   node replay.mjs --from 2026-11-30T09:00:00Z --idle 2
//
// --from: first | last | next (the default) | an offset | a time (ISO 8601, UTC unless it has an
// offset; whole seconds) | an interval back from now (30m, 6h, 1D). --count N: exit after N
// events; --idle S: exit after S seconds without one. Every device event is printed once
// (repeats by seq are counted).
// Env: AMQP_URL, EVENTS_EXCHANGE (the bridge's defaults), STREAM (epsignal.events.replay),
// MAX_AGE (6h).
import { parseArgs } from "node:util";
import amqp from "amqplib";

/** @typedef {import("../../contracts/ts/index.js").Event} Event */

const env = process.env;
const EXCHANGE = env.EVENTS_EXCHANGE ?? "epsignal.events";
const STREAM = env.STREAM ?? "epsignal.events.replay";
const STREAM_ARGS = {
  "x-queue-type": "stream",
  "x-max-age": env.MAX_AGE ?? "6h", // retention: Y M D h m s
  "x-stream-max-segment-size-bytes": 50_000_000, // retention drops whole segments
  "x-max-length-bytes": 20_000_000_000, // and a bound on the disk it takes, whatever the age
};
const BINDINGS = ["device.#", "bridge.*.gap"];

const { values: opts } = parseArgs({ options: {
  from: { type: "string", default: "next" }, count: { type: "string" }, idle: { type: "string" },
  declare: { type: "boolean", default: false },
} });

/** The value of `x-stream-offset` for --from. @param {string} spec */
function offset(spec) {
  if (["first", "last", "next"].includes(spec) || /^\d+[YMDhms]$/.test(spec)) return spec;
  if (/^\d+$/.test(spec)) return Number(spec);
  const zoned = !spec.includes("T") || /([zZ]|[+-]\d\d:?\d\d)$/.test(spec);
  const ms = Date.parse(zoned ? spec : `${spec}Z`); // without an offset: UTC, as in Python
  if (Number.isNaN(ms)) {
    console.error(`replay.mjs: --from ${JSON.stringify(spec)}: not first, last, next, an offset, a time or an interval`);
    process.exit(2);
  }
  return { "!": "timestamp", value: Math.floor(ms / 1000) }; // an AMQP timestamp, in seconds
}
const start = offset(opts.from);

const conn = await amqp.connect(env.AMQP_URL ?? "amqp://guest:guest@localhost/");
const ch = await conn.createChannel();
await ch.assertExchange(EXCHANGE, "topic", { durable: true });
await ch.assertQueue(STREAM, { durable: true, arguments: STREAM_ARGS });
for (const key of BINDINGS) await ch.bindQueue(STREAM, EXCHANGE, key);
if (opts.declare) {
  console.log(`stream ${STREAM} bound to ${BINDINGS.join(", ")} of ${EXCHANGE}`);
  await conn.close();
  process.exit(0);
}

const count = opts.count === undefined ? Infinity : Number(opts.count);
const idleMs = opts.idle === undefined ? 0 : Number(opts.idle) * 1000;
/** @type {Map<string, number>} (instance, hw) -> the last seq printed */
const last = new Map();
let seen = 0, repeats = 0, ended = false;
/** @type {NodeJS.Timeout | undefined} */
let idleTimer;
const end = async () => {
  if (ended) return;
  ended = true;
  clearTimeout(idleTimer);
  console.log(`end: ${seen} events, ${repeats} repeats skipped`);
  await conn.close(); // what was delivered and not acked stays in the stream: never nack it
};
const idle = () => {
  clearTimeout(idleTimer);
  if (idleMs) idleTimer = setTimeout(end, idleMs);
};
process.once("SIGINT", end);

await ch.prefetch(200); // a stream needs a prefetch (per consumer), and manual acks
idle();
await ch.consume(STREAM, (msg) => {
  if (!msg || ended) return;
  /** @type {Event} */
  const ev = JSON.parse(msg.content.toString());
  const where = `offset=${msg.properties.headers?.["x-stream-offset"]} ${msg.fields.routingKey}`;
  if (ev.type === "gap") {
    console.log(`${where} gap ${ev.reason} ${JSON.stringify(ev.dropped)}`);
  } else if (ev.seq <= (last.get(`${ev.instance}/${ev.hw}`) ?? 0)) {
    repeats++;
  } else {
    last.set(`${ev.instance}/${ev.hw}`, ev.seq);
    const what = ev.type === "call.state" ? ev.state : ev.type === "detached" ? ev.reason
      : ev.type === "call.signaling" ? ev.sig.type : "";
    console.log(`${where} seq=${ev.seq} ${what ?? ""}`.trimEnd());
  }
  seen++;
  ch.ack(msg); // acks are credit: the stream sends more as they come
  if (seen >= count) end(); else idle();
}, { noAck: false, arguments: { "x-stream-offset": start } });
