/* Generated from contracts/v1/events/call.signaling.json (urn:epsignal-bridge:v1:events:call.signaling) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * A Signaling message passed (`origin` pbx), was sent for a command (`origin` command) or for an intercept verdict (`origin` intercept).
 */
export interface CallSignaling {
  /**
   * The event name; the same as the AMQP `type` property.
   */
  type: "call.signaling";
  /**
   * Schema version (major), 1 for this schema. Compatible changes (new optional fields) keep it; see contracts/README.md.
   */
  v: 1;
  /**
   * Hardware id of the device, as the PBX knows it (not percent-encoded): 1 to 64 characters, each an ASCII letter or digit or one of `-` `_` `.` `:` `@`.
   */
  hw: string;
  /**
   * Number of the event per device and bridge instance: 1, 2, 3, ... without gaps. (`instance`, `hw`, `seq`) identifies the event; a duplicate has the same.
   */
  seq: number;
  /**
   * Id of the bridge instance that published the event. A restarted bridge has a new id and counts `seq` from 1 again.
   */
  instance: string;
  /**
   * When the bridge saw it: UTC, an RFC 3339 date-time.
   */
  time: string;
  /**
   * Call id on the device; negative for calls the application started.
   */
  call: number;
  /**
   * True: toward the device; false: toward the PBX.
   */
  to: boolean;
  /**
   * `pbx`: passed through the bridge on the signaling path (forwarded, or replaced by an intercept verdict); `command`: sent by the bridge for a signaling command; `intercept`: sent by the bridge for an intercept verdict (the release of a rejected message).
   */
  origin: string;
  /**
   * The EpSignal Signal object exactly as it passed, byte for byte: every field, known or unknown to the bridge, passes through losslessly. Fields as in the innovaphone JSON signaling (`type`, `cg`, `cd`, `cau`, `channel`, `fty`, ...).
   */
  sig: {
    [k: string]: unknown;
  };
  [k: string]: unknown;
}
