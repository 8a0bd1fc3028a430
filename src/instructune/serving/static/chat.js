// The chat page's behaviour. It speaks this server's Ollama API: /api/tags fills the model
// picker, /api/chat answers with NDJSON (one JSON object a line) read as it streams in, and an
// AbortController stops an answer (the server frees the request's row when the client leaves).
"use strict";

const $ = (id) => document.getElementById(id);

// The conversation sent with each request (user and assistant turns, oldest first); the
// system prompt is added in front at send time so that editing it applies to the next turn.
// `epoch` changes on reset, so an answer still in flight cannot write into a new conversation.
const chat = { messages: [], controller: null, epoch: 0 };

// Number inputs and how each becomes an Ollama option; blank inputs are left out.
const NUMBER_OPTIONS = {
  temperature: parseFloat,
  top_p: parseFloat,
  top_k: (v) => parseInt(v, 10),
  repeat_penalty: parseFloat,
  seed: (v) => parseInt(v, 10),
  num_predict: (v) => parseInt(v, 10),
};

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.dataset.busy = busy ? "yes" : "no";
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text; // never innerHTML: the model's text is shown as text
  $("log").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

async function loadModels() {
  const picker = $("model");
  try {
    const response = await fetch("/api/tags");
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    for (const model of body.models) {
      const details = model.details || {};
      const option = new Option(model.name, model.name);
      option.title = [details.family, details.parameter_size].filter(Boolean).join(", ");
      picker.append(option);
    }
    if (!body.models.length) showError("This server serves no models.");
  } catch (err) {
    showError(`Could not list the models: ${err.message}`);
  }
  document.body.dataset.ready = "yes"; // the test waits for this
}

function readOptions() {
  const options = {};
  for (const [key, parse] of Object.entries(NUMBER_OPTIONS)) {
    const input = $(key);
    if (input.value.trim() === "") continue;
    const value = parse(input.value);
    if (!Number.isFinite(value)) throw new Error(`${key}: not a number`);
    options[key] = value;
  }
  return options;
}

// Yields each JSON object of an NDJSON body as its line arrives. A line can be split across
// network chunks, so text is buffered up to the next newline.
async function* ndjson(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value;
    let end;
    while ((end = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, end).trim();
      buffered = buffered.slice(end + 1);
      if (line) yield JSON.parse(line);
    }
  }
  if (buffered.trim()) yield JSON.parse(buffered);
}

function describe(final) {
  // Ollama's timings are in nanoseconds.
  const seconds = final.eval_duration / 1e9;
  const rate = seconds > 0 ? ` (${(final.eval_count / seconds).toFixed(1)} tokens/s)` : "";
  const why = final.done_reason === "length" ? ", stopped at the token limit" : "";
  return `${final.eval_count} tokens in ${seconds.toFixed(2)} s${rate}${why}; ` +
    `prompt ${final.prompt_eval_count} tokens`;
}

async function send(text) {
  const model = $("model").value;
  let options;
  try {
    options = readOptions();
  } catch (err) {
    showError(err.message);
    return;
  }
  if (!model) {
    showError("Pick a model first.");
    return;
  }
  showError("");
  $("message").value = "";
  const epoch = chat.epoch;
  const turn = { role: "user", content: text };
  chat.messages.push(turn);
  const asked = addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.dataset.state = "streaming";
  answer.dataset.chunks = "0";

  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...chat.messages] : chat.messages;
  const controller = new AbortController();
  chat.controller = controller;
  setBusy(true);
  $("status").textContent = `${model} is answering…`;
  try {
    const response = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, options, stream: true }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error || `HTTP ${response.status}`);
    }
    let final = null;
    for await (const event of ndjson(response.body)) {
      // A failure after the answer started arrives as a line of its own.
      if (event.error) throw new Error(event.error);
      if (event.message && event.message.content) {
        answer.textContent += event.message.content;
        answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        answer.scrollIntoView({ block: "end" });
      }
      if (event.done) final = event;
    }
    if (!final) throw new Error("the answer ended early");
    if (epoch === chat.epoch) {
      chat.messages.push({ role: "assistant", content: answer.textContent });
    }
    answer.dataset.state = "done";
    $("status").textContent = describe(final);
  } catch (err) {
    if (epoch !== chat.epoch) return; // reset while answering: that conversation is gone
    if (err.name === "AbortError") {
      // Stopped by the user: the partial answer stays, as the model's turn.
      chat.messages.push({ role: "assistant", content: answer.textContent });
      answer.dataset.state = "stopped";
      $("status").textContent = "Stopped.";
    } else {
      // Nothing of a failed turn stays: the message goes back to the box to send again.
      chat.messages.splice(chat.messages.indexOf(turn), 1);
      asked.remove();
      answer.remove();
      $("message").value = text;
      // The server refuses a conversation longer than the model's context window.
      const long = /context window/.test(err.message);
      showError(long ? `${err.message} (Reset starts a new conversation.)` : err.message);
      $("status").textContent = "";
    }
  } finally {
    if (chat.controller === controller) {
      chat.controller = null;
      setBusy(false);
    }
  }
}

function stop() {
  if (chat.controller) chat.controller.abort();
}

function reset() {
  chat.epoch += 1;
  stop();
  chat.controller = null;
  setBusy(false);
  chat.messages = [];
  $("log").replaceChildren();
  showError("");
  $("status").textContent = "New conversation.";
  $("message").focus();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  if (text && !chat.controller) send(text);
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", stop);
$("reset").addEventListener("click", reset);
setBusy(false);
loadModels();
