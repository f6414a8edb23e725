// node chat_stream.mjs <base URL> <model>: every chunk of a streamed chat completion.
import { client, emit } from "./client.mjs";

const stream = await client().chat.completions.create({
  model: process.argv[3],
  messages: [{ role: "user", content: "hi" }],
  stream: true,
  stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  emit("chunk", chunk);
}
emit("end", null);
