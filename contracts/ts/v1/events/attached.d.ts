/* Generated from contracts/v1/events/attached.json (urn:epsignal-bridge:v1:events:attached) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * The bridge is in the device's signaling path (the PBX attached it).
 */
export interface DeviceAttached {
  /**
   * The event name; the same as the AMQP `type` property.
   */
  type: "attached";
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
   * What the PBX answered to the Attach.
   */
  attach: AttachInfo;
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
