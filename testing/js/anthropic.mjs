// node anthropic.mjs <base URL> <plan>: Anthropic's official JavaScript SDK against a
// stageserver's /v1/messages (tests/test_anthropic_js.py). The plan is JSON: {"call",
// "params", "apiKey" | "authToken"}; call is one of
//   create        messages.create(params): the message, or every raw event with stream;
//   stream        messages.stream(params): every event, then its finalMessage();
//   tool_round    create, then create again with the answer and a tool_result for each
//                 tool_use ("result of <name>"): both messages;
//   count_tokens  messages.countTokens(params);
//   models        every model of models.list(params), page after page.
// One JSON line on stdout per thing received, {kind, value}, then {"kind": "end"}; an API
// error is {"kind": "error", "value": {class, status, body, message}}. No retries.
import Anthropic from "@anthropic-ai/sdk";

const [base, planText] = process.argv.slice(2);
if (!base || !planText) {
  throw new Error("usage: node anthropic.mjs <stageserver base URL> <plan JSON>");
}
const plan = JSON.parse(planText);
const client = new Anthropic({
  baseURL: base,
  apiKey: plan.apiKey ?? null,
  authToken: plan.authToken ?? null,
  maxRetries: 0,
});

function emit(kind, value) {
  process.stdout.write(`${JSON.stringify({ kind, value })}\n`);
}

function results(message) {
  return message.content
    .filter((block) => block.type === "tool_use")
    .map((block) => ({
      type: "tool_result",
      tool_use_id: block.id,
      content: `result of ${block.name}`,
    }));
}

async function run(call, params) {
  if (call === "create") {
    const answer = await client.messages.create(params);
    if (params.stream) {
      for await (const event of answer) emit("event", event);
    } else {
      emit("message", answer);
    }
  } else if (call === "stream") {
    const stream = client.messages.stream(params);
    for await (const event of stream) emit("event", event);
    emit("final", await stream.finalMessage());
  } else if (call === "tool_round") {
    const first = await client.messages.create(params);
    emit("message", first);
    const messages = [
      ...params.messages,
      { role: first.role, content: first.content },
      { role: "user", content: results(first) },
    ];
    emit("message", await client.messages.create({ ...params, messages }));
  } else if (call === "count_tokens") {
    emit("count", await client.messages.countTokens(params));
  } else if (call === "models") {
    for await (const model of client.models.list(params)) emit("model", model);
  } else {
    throw new Error(`unknown call ${call}`);
  }
}

try {
  await run(plan.call, plan.params ?? {});
} catch (err) {
  if (!(err instanceof Anthropic.APIError)) throw err;
  emit("error", {
    class: err.constructor.name,
    status: err.status ?? null,
    body: err.error ?? null,
    message: err.message,
  });
}
emit("end", null);
