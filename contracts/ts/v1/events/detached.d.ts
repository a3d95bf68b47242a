/* Generated from contracts/v1/events/detached.json (urn:epsignal-bridge:v1:events:detached) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * The bridge is no longer in the device's signaling path.
 */
export interface DeviceDetached {
  /**
   * The event name; the same as the AMQP `type` property.
   */
  type: "detached";
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
   * Why: `unregistered` (the PBX said Detached), `command` (a detach command), `session-lost` (the PBX session broke; the bridge reconnects), `shutdown` (the bridge stops), `lease-moved` (handed on to another replica, which attaches it next), `lease-lost` (another replica holds the device's lease now), `wanted-detached` (the replica that now holds the device's lease keeps it detached: a detach command made under the current configuration; docs/SCALING.md).
   */
  reason: string;
  [k: string]: unknown;
}
