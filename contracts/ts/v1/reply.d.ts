/* Generated from contracts/v1/reply.json (urn:epsignal-bridge:v1:reply:reply) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * The answer to a command that had `reply_to`, sent to that queue with the command's `correlation_id`. Optional fields are left out, never null.
 */
export interface Reply {
  /**
   * True: carried out; false: refused (see `error`; the command was also dead-lettered).
   */
  ok: boolean;
  /**
   * Schema version (major), 1 for this schema. Compatible changes (new optional fields) keep it; see contracts/README.md.
   */
  v: 1;
  /**
   * The verb of the command (`attach`, `detach`, `signaling`); absent when the routing key names none of them.
   */
  command?: string;
  /**
   * The device the command was for; absent when the routing key names no valid hw id.
   */
  hw?: string;
  /**
   * Why the command was refused (also the dead letter's `x-epsignal-error`).
   */
  error?: string;
  /**
   * attach: what the PBX answered (without the TURN password).
   */
  attach?: AttachInfo;
  /**
   * attach: true when the device is registered and attached now; false: it will be attached when it registers (an `attached` event says so).
   */
  attached?: boolean;
  /**
   * detach: the device was attached when the command came.
   */
  was_attached?: boolean;
  /**
   * intercept: the device's effective intercept rules now (the command's and the configuration's, every option decided).
   */
  rules?: Effective[];
  [k: string]: unknown;
}
/**
 * What the PBX told about the attachment: its AttachResult without the TURN password.
 */
export interface AttachInfo {
  /**
   * STUN servers (host[:port]); absent when none.
   */
  stun?: string[];
  /**
   * TURN servers (host[:port]); absent when none.
   */
  turn?: string[];
  /**
   * TURN user name. The TURN password is never published.
   */
  turnUsr?: string | null;
  /**
   * Prefix for international numbers.
   */
  prefixIntl?: string | null;
  /**
   * Prefix for national numbers.
   */
  prefixNtl?: string | null;
  /**
   * Prefix for subscriber numbers.
   */
  prefixSubs?: string | null;
  /**
   * Area code.
   */
  area?: string | null;
  /**
   * Country code.
   */
  country?: string | null;
  /**
   * Length of internal numbers (newer PBX releases; undocumented, an integer so far).
   */
  maxIntern?: unknown;
  /**
   * Tone scheme (newer PBX releases; undocumented, an integer so far).
   */
  tones?: unknown;
  [k: string]: unknown;
}
/**
 * An intercept rule in effect, every option decided.
 */
export interface Effective {
  /**
   * The sig type held for a verdict.
   */
  type:
    | "accept"
    | "alert"
    | "call_proc"
    | "channels"
    | "conn"
    | "disc"
    | "facility"
    | "info"
    | "media_info"
    | "progress"
    | "rel"
    | "setup"
    | "setup_ack"
    | "user_info";
  /**
   * True: toward the device; false: toward the PBX.
   */
  to: boolean;
  /**
   * How long a message waits for its verdict.
   */
  deadline_ms: number;
  /**
   * `open` or `closed`.
   */
  fail: "closed" | "open";
  /**
   * The cause of a fail-closed rejection.
   */
  cause: number;
  /**
   * `command` (an intercept command) or `config` (EPSIGNAL_INTERCEPT).
   */
  source: "command" | "config";
  [k: string]: unknown;
}
