/* Generated from contracts/v1/commands/signaling.json (urn:epsignal-bridge:v1:commands:signaling) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * Send a Signaling message on the device's behalf, toward the PBX (`to` false) or the device.
 */
export interface SignalingCommand {
  /**
   * Call id on the device. Negative: a call the application starts (click to dial: a `setup` toward the PBX with call -1). Valid: a non-zero integer from -2147483648 to 2147483647: positive for the PBX's calls, negative for calls the application starts.
   */
  call: number;
  /**
   * The EpSignal Signal object exactly as it passed, byte for byte: every field, known or unknown to the bridge, passes through losslessly. Fields as in the innovaphone JSON signaling (`type`, `cg`, `cd`, `cau`, `channel`, `fty`, ...). Must be an object with a string `type`; the fields the bridge reads must have the types below.
   */
  sig: Sig;
  /**
   * True: send toward the device; false or absent: toward the PBX.
   */
  to?: boolean;
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
