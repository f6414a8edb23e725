// node responses_resume.mjs <base URL> <model> <N>: a background response streamed until
// its event N, left, then streamed again with retrieve(id, {stream, starting_after: N}).
import { client, emit } from "./client.mjs";

const openai = client();
const after = Number(process.argv[4]);
const created = await openai.responses.create({
  model: process.argv[3],
  input: "hi",
  background: true,
  stream: true,
});
let id = null;
for await (const event of created) {
  emit("created", event);
  id ??= event.response?.id;
  if (event.sequence_number >= after) {
    break; // the SDK drops the connection; a background response runs on
  }
}
const resumed = await openai.responses.retrieve(id, { stream: true, starting_after: after });
for await (const event of resumed) {
  emit("resumed", event);
}
emit("end", null);
