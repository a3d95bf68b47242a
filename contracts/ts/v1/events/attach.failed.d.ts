/* Generated from contracts/v1/events/attach.failed.json (urn:epsignal-bridge:v1:events:attach.failed) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * The PBX refused the Attach; the bridge does not retry.
 */
export interface AttachFailed {
  /**
   * The event name; the same as the AMQP `type` property.
   */
  type: "attach.failed";
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
   * The PBX's `err`, as text (e.g. `unknown device`).
   */
  error: string;
  [k: string]: unknown;
}
