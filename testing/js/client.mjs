// What every script shares: the official SDK's client for a stageserver's /v1, and one
// JSON line on stdout per thing received.
import OpenAI from "openai";

/** The client for the server whose base URL is the script's first argument. */
export function client() {
  const base = process.argv[2];
  if (!base) {
    throw new Error("usage: node <script>.mjs <stageserver base URL> <model> [...]");
  }
  // No retries: a failure shows as it is. Any key: the server under test takes none.
  return new OpenAI({ baseURL: `${base}/v1`, apiKey: "sk-test", maxRetries: 0 });
}

export function emit(kind, value) {
  process.stdout.write(`${JSON.stringify({ kind, value })}\n`);
}
