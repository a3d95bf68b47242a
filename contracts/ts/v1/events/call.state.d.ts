/* Generated from contracts/v1/events/call.state.json (urn:epsignal-bridge:v1:events:call.state) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * State of a call. `null`: not known yet (a call first seen mid-call); `disconnected`: the remote side hung up; `disconnecting`: the device hung up; `released`: the call is gone (the last event of a call).
 */
export type CallState =
  | "alert"
  | "call-proc"
  | "connected"
  | "disconnected"
  | "disconnecting"
  | "null"
  | "parked"
  | "released"
  | "setup"
  | "setup-ack";

/**
 * A call's state changed, or a Sync at attach told it (`sync` true).
 */
export interface CallStateChanged {
  /**
   * The event name; the same as the AMQP `type` property.
   */
  type: "call.state";
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
   * Call id on the device; negative for calls the application started (click to dial).
   */
  call: number;
  /**
   * The new state of the call.
   */
  state: CallState;
  /**
   * True: a call to the device; false: from the device; null: not known (first seen mid-call).
   */
  in: boolean | null;
  /**
   * The remote party, as far as known (fields absent when unknown).
   */
  remote: Remote;
  /**
   * Media channel, when the PBX named one.
   */
  channel: number | null;
  /**
   * The call is on hold.
   */
  held: boolean;
  /**
   * The call was started by the application (negative `call`).
   */
  app: boolean;
  /**
   * Q.931 cause of `released` (and of `disconnected`/`disconnecting` when the PBX gave one).
   */
  cause: Cause | null;
  /**
   * True when the state comes from a Sync at attach (the call existed before), not from a Signaling message.
   */
  sync: boolean;
  /**
   * Only with `released`, and only when the bridge stopped tracking the call, not the PBX ended it (the PBX may still have it; no `cause`): `idle` (no signaling for EPSIGNAL_CALL_IDLE_S, or EPSIGNAL_CONNECTED_CALL_IDLE_S when connected, held, parked or state unknown), `too-many-calls` (more than EPSIGNAL_MAX_CALLS_PER_DEVICE calls: the least recently signaled one). Should the call signal again, it comes back as a call first seen mid-call.
   */
  evicted?: "idle" | "too-many-calls";
  [k: string]: unknown;
}
/**
 * The remote party of a call.
 */
export interface Remote {
  /**
   * Number.
   */
  num?: string | null;
  /**
   * SIP user name.
   */
  sip?: string | null;
  /**
   * Display name.
   */
  dn?: string | null;
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
