/* Generated from contracts/v1/intercept/request.json (urn:epsignal-bridge:v1:intercept:request) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * A message held for a verdict (intercept mode, docs/INTERCEPT.md). Not an event: not numbered, not persistent, published with `mandatory` (nobody bound: the fail policy applies at once) and `expiration` = the deadline. Answer with a Verdict to `reply_to`.
 */
export interface InterceptRequest {
  /**
   * The event name; the same as the AMQP `type` property.
   */
  type: "call.intercept";
  /**
   * Schema version (major), 1 for this schema. Compatible changes (new optional fields) keep it; see contracts/README.md.
   */
  v: 1;
  /**
   * `<instance>/<hw>/i<n>`: the verdict's `id` and `correlation_id`.
   */
  id: string;
  /**
   * Hardware id of the device, as the PBX knows it (not percent-encoded): 1 to 64 characters, each an ASCII letter or digit or one of `-` `_` `.` `:` `@`.
   */
  hw: string;
  /**
   * Id of the bridge instance that published the event. A restarted bridge has a new id and counts `seq` from 1 again.
   */
  instance: string;
  /**
   * When the bridge saw it: UTC, an RFC 3339 date-time.
   */
  time: string;
  /**
   * Call id on the device.
   */
  call: number;
  /**
   * True: the message goes toward the device (it came from the PBX); false: toward the PBX.
   */
  to: boolean;
  /**
   * The EpSignal Signal object exactly as it passed, byte for byte: every field, known or unknown to the bridge, passes through losslessly. Fields as in the innovaphone JSON signaling (`type`, `cg`, `cd`, `cau`, `channel`, `fty`, ...). The held message, as it would be forwarded.
   */
  sig: Sig;
  /**
   * After this (UTC, RFC 3339) the fail policy applies and a verdict is ignored.
   */
  deadline: string;
  /**
   * The rule's deadline in milliseconds, counted from the moment the message arrived (`deadline` and the message's `expiration` are what is left of it).
   */
  deadline_ms: number;
  /**
   * What happens without a verdict: `open`, forwarded unchanged; `closed`, rejected.
   */
  fail: "closed" | "open";
  [k: string]: unknown;
}
/**
 * The Signal object of an EpSignal Signaling message (the fields the bridge reads; any other field is passed on untouched).
 */
export interface Sig {
  /**
   * Message type: `setup`, `setup_ack`, `call_proc`, `alert`, `conn`, `disc`, `rel`, `info`, ...
   */
  type: string;
  /**
   * Calling party.
   */
  cg?: Party;
  /**
   * Called party.
   */
  cd?: Party;
  /**
   * Q.931 cause (`disc`, `rel`).
   */
  cau?: Cause;
  /**
   * Media channel.
   */
  channel?: number;
  /**
   * Facilities (`name_identification`, `hold_notify`, `retrieve_notify`, `cp_park`, ...).
   */
  fty?: Facility[];
  [k: string]: unknown;
}
/**
 * An endpoint of a call (`cg` calling, `cd` called).
 */
export interface Party {
  /**
   * Number.
   */
  num?: string;
  /**
   * SIP user name.
   */
  sip?: string;
  [k: string]: unknown;
}
/**
 * A Q.931 cause.
 */
export interface Cause {
  /**
   * Q.931 cause value (16: normal clearing, 17: busy, ...).
   */
  num?: number | null;
  /**
   * Cause location, as the PBX sent it (type undocumented).
   */
  loc?: unknown;
  [k: string]: unknown;
}
/**
 * One entry of `fty`.
 */
export interface Facility {
  /**
   * Facility type.
   */
  type: string;
  /**
   * The name, for `name_identification`.
   */
  name?: string;
  [k: string]: unknown;
}
