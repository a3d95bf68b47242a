/* Generated from contracts/v1/events/gap.json (urn:epsignal-bridge:v1:events:gap) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * Events were dropped unsent during a long broker outage (buffer full or too old), per device as `seq` ranges. Published before the events that follow the gap.
 */
export interface Gap {
  /**
   * The event name; the same as the AMQP `type` property.
   */
  type: "gap";
  /**
   * Schema version (major), 1 for this schema. Compatible changes (new optional fields) keep it; see contracts/README.md.
   */
  v: 1;
  /**
   * Id of the bridge instance that published the event. A restarted bridge has a new id and counts `seq` from 1 again.
   */
  instance: string;
  /**
   * When the bridge saw it: UTC, an RFC 3339 date-time.
   */
  time: string;
  /**
   * Why they were dropped: `buffer-full`, `too-old`, or both joined by `+` (`buffer-full+too-old`).
   */
  reason: string;
  /**
   * The events dropped unsent: per device (key: hw, not percent-encoded), ranges of `seq`.
   */
  dropped: {
    [k: string]: SeqRange[];
  };
  [k: string]: unknown;
}
/**
 * A range of `seq`, both ends included.
 */
export interface SeqRange {
  /**
   * First `seq` dropped.
   */
  first: number;
  /**
   * Last `seq` dropped (inclusive).
   */
  last: number;
  [k: string]: unknown;
}
