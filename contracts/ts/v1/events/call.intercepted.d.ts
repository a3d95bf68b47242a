/* Generated from contracts/v1/events/call.intercepted.json (urn:epsignal-bridge:v1:events:call.intercepted) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * How an intercepted message ended (docs/INTERCEPT.md). Published before the `call.signaling` and `call.state` events of what passed.
 */
export interface CallIntercepted {
  /**
   * The event name; the same as the AMQP `type` property.
   */
  type: "call.intercepted";
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
   * Call id on the device (intercepted calls have positive ids).
   */
  call: number;
  /**
   * True: the message went toward the device (it came from the PBX); false: toward the PBX.
   */
  to: boolean;
  /**
   * The intercept request's id (its `correlation_id`).
   */
  id: string;
  /**
   * The held message's sig type (`setup`, ...).
   */
  sig_type: string;
  /**
   * How the hold ended: `forward`, `replace`, `reject` (a verdict); `timeout` (no verdict by the deadline), `unroutable` (nobody bound to the request's key), `broker-down` (the request could not be published, or the link was lost while held), `stopping` (the bridge stopped): the rule's fail policy decided; `bad-verdict` (refused, see `error`: forwarded unchanged whatever the policy); `session-lost` (the PBX session ended: nothing to send to).
   */
  outcome: string;
  /**
   * What happened to the message: `forwarded` (unchanged), `replaced` (the verdict's sig went instead), `rejected` (not forwarded; a `rel` with `cause` went back the way it came), `dropped` (the session was gone).
   */
  action: string;
  /**
   * Milliseconds the message was held.
   */
  waited_ms: number;
  /**
   * bad-verdict: why the verdict was refused.
   */
  error?: string;
  /**
   * rejected: the cause of the `rel` the bridge sent back.
   */
  cause?: number;
  [k: string]: unknown;
}
