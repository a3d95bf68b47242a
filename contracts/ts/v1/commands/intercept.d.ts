/* Generated from contracts/v1/commands/intercept.json (urn:epsignal-bridge:v1:commands:intercept) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * Set the device's intercept rules (docs/INTERCEPT.md): which messages wait for a verdict from the bus. Replaces the rules set by command before; with leases they follow the device to another replica.
 */
export interface InterceptCommand {
  /**
   * The device's intercept rules, replacing those set by command before (`[]` clears them; the configuration's, EPSIGNAL_INTERCEPT, stay). At most 32. A command's rule wins over a configuration rule for the same (`type`, `to`).
   *
   * @maxItems 32
   */
  rules: Rule[];
  /**
   * Schema version (major), 1 for this schema. Compatible changes (new optional fields) keep it; see contracts/README.md.
   */
  v?: 1;
}
/**
 * What to intercept: messages of a sig type in one direction (docs/INTERCEPT.md).
 */
export interface Rule {
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
   * True: messages toward the device (from the PBX); false: from the device toward the PBX.
   */
  to: boolean;
  /**
   * How long a message waits for its verdict (20 to 4000; default EPSIGNAL_INTERCEPT_DEADLINE_MS).
   */
  deadline_ms?: number;
  /**
   * Without a verdict: `open`, forward unchanged; `closed`, reject (default EPSIGNAL_INTERCEPT_FAIL).
   */
  fail?: "closed" | "open";
  /**
   * The cause of the `rel` a fail-closed rejection sends (default EPSIGNAL_INTERCEPT_CAUSE).
   */
  cause?: number;
}
