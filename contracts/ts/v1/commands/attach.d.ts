/* Generated from contracts/v1/commands/attach.json (urn:epsignal-bridge:v1:commands:attach) by json-schema-to-typescript 16.0.0
 * (examples/node/gen-types.mjs). Do not edit: run `npm run types --prefix examples/node`. */

/**
 * Attach the device: the bridge gets into its signaling path. Idempotent. The body may also be empty.
 */
export interface AttachCommand {
  /**
   * Schema version (major), 1 for this schema. Compatible changes (new optional fields) keep it; see contracts/README.md.
   */
  v?: 1;
  [k: string]: unknown;
}
