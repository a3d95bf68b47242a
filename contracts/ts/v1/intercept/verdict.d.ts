/* Generated from contracts/v1/intercept/verdict.json (urn:epsignal-bridge:v1:intercept:verdict) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * The answer to an InterceptRequest: to its `reply_to` through the default exchange, with `correlation_id` = the request's `id`, before its `deadline`. Strict: an unknown field makes it a bad verdict (the message is forwarded unchanged).
 */
export interface Verdict {
  /**
   * The request's `id`.
   */
  id: string;
  /**
   * `forward` (unchanged, or `sig` instead) or `reject` (not forwarded; a `rel` goes back the way it came).
   */
  verdict: "forward" | "reject";
  /**
   * forward only: the Signal object to forward instead, with the same `type` as the held one (e.g. the setup with the caller's name replaced).
   */
  sig?: Sig;
  /**
   * reject only: the cause of the `rel` (1 to 127; default 21, call rejected).
   */
  cause?: number;
  /**
   * Schema version (major), 1 for this schema. Compatible changes (new optional fields) keep it; see contracts/README.md.
   */
  v?: 1;
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
