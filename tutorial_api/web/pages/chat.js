// The chat page: a student's key kept in this browser, a conversation streamed over the server's
// OpenAI API (/v1/chat/completions), answers shown as plain text. No library, no build step.
"use strict";

const KEY_STORE = "tutorial_api.key";

const TEXTS = {
  en: {
    title: "Chat",
    newChat: "New chat",
    changeKey: "Change key",
    keyLabel: "Your API key",
    keySave: "Save",
    keyHint:
      "The key your teacher gave you. It stays in this browser: it is sent only to this server, " +
      "in a header, never in an address. Leave it empty if the server needs no key.",
    send: "Send",
    stop: "Stop",
    placeholder: "Ask something… (Enter sends, Shift+Enter starts a new line)",
    model: (name) => `model: ${name}`,
    stats: (first, tokens, rate) =>
      `first token after ${first} s · ${tokens} tokens · ${rate} tokens/s`,
    stopped: "(stopped)",
    unauthorized:
      "The server did not accept your API key (401). Check it for typos, or ask your teacher " +
      "for yours, then enter it again above.",
    tooMany: (seconds) =>
      "You have too many questions in flight at once (429). Wait for an answer to finish" +
      (seconds ? `, or try again in ${seconds} s.` : "."),
    busy: (seconds) =>
      "The server is busy or not ready (503): the whole class is asking at once, or the model " +
      "is still loading. " +
      (seconds ? `Try again in ${seconds} s.` : "Try again in a moment."),
    failed: (status) => `The server refused the question (${status}).`,
    unreachable: "The server cannot be reached. Is it still running, and are you on its network?",
  },
  zh: {
    title: "对话",
    newChat: "新对话",
    changeKey: "更换密钥",
    keyLabel: "你的 API 密钥",
    keySave: "保存",
    keyHint:
      "老师发给你的密钥。它只保存在这个浏览器里，只放在请求头里发给本服务器，不会出现在网址中。" +
      "如果服务器不需要密钥，留空即可。",
    send: "发送",
    stop: "停止",
    placeholder: "输入你的问题……（Enter 发送，Shift+Enter 换行）",
    model: (name) => `模型：${name}`,
    stats: (first, tokens, rate) => `首个 token 用时 ${first} 秒 · ${tokens} 个 token · 每秒 ${rate} 个`,
    stopped: "（已停止）",
    unauthorized: "服务器没有接受你的 API 密钥（401）。请检查是否输错，或向老师要你的密钥，然后在上方重新输入。",
    tooMany: (seconds) =>
      "你同时在等的回答太多了（429）。请等前一个回答结束" +
      (seconds ? `，或 ${seconds} 秒后再试。` : "再提问。"),
    busy: (seconds) =>
      "服务器正忙或还没准备好（503）：可能全班同时在提问，或者模型还在加载。" +
      (seconds ? `请 ${seconds} 秒后再试。` : "请稍后再试。"),
    failed: (status) => `服务器拒绝了这个问题（${status}）。`,
    unreachable: "连不上服务器。请确认它还在运行，并且你和它在同一个网络里。",
  },
};

const language = navigator.language.toLowerCase().startsWith("zh") ? "zh" : "en";
const text = TEXTS[language];

const page = {
  history: document.getElementById("history"),
  notice: document.getElementById("notice"),
  keyForm: document.getElementById("key-form"),
  key: document.getElementById("key"),
  ask: document.getElementById("ask"),
  prompt: document.getElementById("prompt"),
  send: document.getElementById("send"),
  stop: document.getElementById("stop"),
  model: document.getElementById("model"),
};

let messages = []; // the conversation so far, as the API takes it
let asking = null; // the AbortController of the answer being streamed

function translatePage() {
  document.documentElement.lang = language === "zh" ? "zh-CN" : "en";
  for (const element of document.querySelectorAll("[data-text]")) {
    element.textContent = text[element.dataset.text];
  }
  page.prompt.placeholder = text.placeholder;
}

function showKeyForm() {
  page.key.value = localStorage.getItem(KEY_STORE) || "";
  page.keyForm.hidden = false;
  page.key.focus();
}

// A student's own link, ADDRESS/#key=KEY, saves the key as the form does, then leaves the address
// bar: the fragment never reaches the server, and a screen shared later shows no key.
function takeKeyFromLink() {
  const given = new URLSearchParams(location.hash.slice(1)).get("key");
  if (given === null) {
    return;
  }
  localStorage.setItem(KEY_STORE, given.trim());
  history.replaceState(null, "", location.pathname + location.search);
  page.keyForm.hidden = true;
  notify("");
}

function notify(message) {
  page.notice.textContent = message;
  page.notice.hidden = !message;
}

function addMessage(role, content) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  element.textContent = content;
  page.history.append(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

function addStats(firstSeconds, tokens, tokenSeconds) {
  const element = document.createElement("div");
  element.className = "stats";
  const rate = tokenSeconds > 0 ? (tokens / tokenSeconds).toFixed(1) : "–";
  element.textContent = text.stats(firstSeconds.toFixed(2), tokens, rate);
  page.history.append(element);
}

async function refusal(response) {
  // The server's own message (in English) follows the explanation, for the teacher.
  let detail = "";
  try {
    const body = await response.json();
    detail = body.error?.message || body.message || "";
  } catch {
    // A body that is not JSON: the explanation alone.
  }
  const seconds = response.headers.get("Retry-After");
  const explained = {
    401: text.unauthorized,
    429: text.tooMany(seconds),
    503: text.busy(seconds),
  }[response.status];
  if (response.status === 401) {
    showKeyForm();
  }
  return [explained || text.failed(response.status), detail].filter(Boolean).join("\n");
}

// Yield each server-sent event's data, as the stream's bytes arrive.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let held = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      return;
    }
    const parts = (held + value).replace(/\r\n/g, "\n").split("\n\n");
    held = parts.pop();
    for (const part of parts) {
      const data = part
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      if (data) {
        yield data;
      }
    }
  }
}

async function askServer(question) {
  messages.push({ role: "user", content: question });
  const asked = addMessage("user", question);
  const answer = addMessage("assistant", "");
  // A refused question leaves the history, back to the prompt box, to send again.
  const takeBack = () => {
    asked.remove();
    answer.remove();
    messages.pop();
    page.prompt.value = question;
  };
  const key = localStorage.getItem(KEY_STORE);
  const headers = { "Content-Type": "application/json" };
  if (key) {
    headers.Authorization = `Bearer ${key}`;
  }
  asking = new AbortController();
  const sent = performance.now();
  let firstAt = null;
  let lastAt = null;
  let pieces = 0;
  let usage = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers,
      body: JSON.stringify({ messages, stream: true, stream_options: { include_usage: true } }),
      signal: asking.signal,
    });
    if (!response.ok) {
      takeBack();
      notify(await refusal(response));
      return;
    }
    for await (const data of events(response)) {
      if (data === "[DONE]") {
        break;
      }
      const event = JSON.parse(data);
      if (event.error) {
        notify(event.error.message);
        break;
      }
      usage = event.usage || usage;
      const piece = event.choices?.[0]?.delta?.content;
      if (piece) {
        lastAt = performance.now();
        firstAt = firstAt ?? lastAt;
        pieces += 1;
        answer.textContent += piece;
        answer.scrollIntoView({ block: "end" });
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") {
      takeBack();
      notify(text.unreachable);
      return;
    }
    answer.textContent += text.stopped;
  } finally {
    asking = null;
  }
  messages.push({ role: "assistant", content: answer.textContent });
  if (firstAt !== null) {
    // Without the usage (a stopped answer), each text event counts as one token.
    const tokens = usage ? usage.completion_tokens : pieces;
    addStats((firstAt - sent) / 1000, tokens, (lastAt - firstAt) / 1000);
  }
}

async function showModel() {
  try {
    const health = await (await fetch("health")).json();
    page.model.textContent = text.model(health.model);
  } catch {
    page.model.textContent = "";
  }
}

function setAsking(busy) {
  page.send.hidden = busy;
  page.stop.hidden = !busy;
  page.prompt.disabled = busy;
}

page.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY_STORE, page.key.value.trim());
  page.key.value = "";
  page.keyForm.hidden = true;
  notify("");
  page.prompt.focus();
});

page.ask.addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = page.prompt.value.trim();
  if (!question || asking) {
    return;
  }
  page.prompt.value = "";
  notify("");
  setAsking(true);
  try {
    await askServer(question);
  } finally {
    setAsking(false);
    (page.keyForm.hidden ? page.prompt : page.key).focus();
  }
});

page.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    page.ask.requestSubmit();
  }
});

page.stop.addEventListener("click", () => asking?.abort());

document.getElementById("new-chat").addEventListener("click", () => {
  asking?.abort();
  messages = [];
  page.history.replaceChildren();
  notify("");
});

document.getElementById("change-key").addEventListener("click", showKeyForm);
window.addEventListener("hashchange", takeKeyFromLink);

takeKeyFromLink();
translatePage();
showModel();
if (localStorage.getItem(KEY_STORE) === null) {
  showKeyForm();
}
