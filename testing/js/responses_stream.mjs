// node responses_stream.mjs <base URL> <model>: every event of a streamed response.
import { client, emit } from "./client.mjs";

const stream = await client().responses.create({
  model: process.argv[3],
  input: "hi",
  stream: true,
});
for await (const event of stream) {
  emit("event", event);
}
emit("end", null);
