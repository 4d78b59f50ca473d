// The teacher's dashboard: polls /dashboard/data with a teacher's key, kept in this browser, and
// shows the class at a glance. The figures are /metrics' own; no prompt text ever reaches it.
"use strict";

const POLL_MS = 2000;
const CHART_SECONDS = 300; // the tokens/s chart spans the last five minutes

const TEXTS = {
  en: {
    title: "Class dashboard",
    changeKey: "Change key",
    keyLabel: "Teacher's key",
    keySave: "Save",
    running: "answering now",
    waiting: "waiting",
    rate: "tokens/s",
    firstToken: "first token p50 / p90 (s)",
    answerTime: "answer p50 / p90 (s)",
    refusals: "refusals",
    key: "Key",
    requests: "Requests",
    tokens: "Tokens",
    lastSeen: "Last seen",
    asking: "Asking now",
    updated: (time) => `updated ${time}`,
    askingNow: (status, seconds, tokens) => `${status}, ${seconds} s, ${tokens} tokens`,
    status: { waiting: "waiting", prefilling: "reading", running: "answering" },
    unauthorized: "This key is not accepted (401): enter a teacher's key.",
    forbidden: "This key is a student's (403): the dashboard needs a key marked (teacher).",
    unreachable: "The server cannot be reached.",
  },
  zh: {
    title: "课堂看板",
    changeKey: "更换密钥",
    keyLabel: "教师密钥",
    keySave: "保存",
    running: "正在回答",
    waiting: "排队中",
    rate: "每秒 token 数",
    firstToken: "首 token 用时 p50 / p90（秒）",
    answerTime: "回答用时 p50 / p90（秒）",
    refusals: "被拒绝的请求",
    key: "密钥",
    requests: "请求数",
    tokens: "token 数",
    lastSeen: "最近一次",
    asking: "正在提问",
    updated: (time) => `更新于 ${time}`,
    askingNow: (status, seconds, tokens) => `${status}，${seconds} 秒，${tokens} 个 token`,
    status: { waiting: "排队中", prefilling: "读题中", running: "回答中" },
    unauthorized: "密钥无效（401）：请输入教师密钥。",
    forbidden: "这是学生的密钥（403）：看板需要在密钥文件里标为 (teacher) 的密钥。",
    unreachable: "连不上服务器。",
  },
};

const text = TEXTS[language];
const rates = []; // [seconds since the epoch, tokens/s] for the chart
let previous = null; // the last poll's time and completion tokens

// The samples of one metric, as /metrics has them.
function samples(data, name) {
  return data.samples[name] || [];
}

function total(data, name) {
  return samples(data, name).reduce((sum, sample) => sum + sample.value, 0);
}

// A quantile from a histogram's cumulative buckets, interpolated as Prometheus'
// histogram_quantile does.
function quantile(data, name, q) {
  const buckets = samples(data, `${name}_bucket`)
    .map((sample) => [Number(sample.labels.le), sample.value])
    .sort((a, b) => a[0] - b[0]);
  const count = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (!count) {
    return null;
  }
  const rank = q * count;
  let [lower, below] = [0, 0];
  for (const [upper, cumulative] of buckets) {
    if (cumulative >= rank) {
      if (!Number.isFinite(upper)) {
        return lower;
      }
      return lower + ((upper - lower) * (rank - below)) / (cumulative - below || 1);
    }
    [lower, below] = [upper, cumulative];
  }
  return lower;
}

function pair(data, name) {
  const [p50, p90] = [quantile(data, name, 0.5), quantile(data, name, 0.9)];
  return p50 === null ? "–" : `${p50.toFixed(2)} / ${p90.toFixed(2)}`;
}

function drawChart() {
  const canvas = byId("chart");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (rates.length < 2) {
    return;
  }
  const newest = rates[rates.length - 1][0];
  const span = Math.min(CHART_SECONDS, newest - rates[0][0]); // the first minutes fill the width
  const highest = Math.max(1, ...rates.map(([, rate]) => rate));
  context.strokeStyle = "#1f5fbf";
  context.lineWidth = 2;
  context.beginPath();
  rates.forEach(([time, rate], index) => {
    const x = canvas.width * (1 - (newest - time) / span);
    const y = canvas.height - 8 - (canvas.height - 24) * (rate / highest);
    index ? context.lineTo(x, y) : context.moveTo(x, y);
  });
  context.stroke();
  context.fillStyle = "#5d6675";
  context.font = "12px sans-serif";
  context.fillText(`${highest.toFixed(0)} tokens/s`, 6, 14);
}

function tableRow(cells, asking) {
  const row = document.createElement("tr");
  row.className = asking ? "asking" : "";
  for (const value of cells) {
    const cell = document.createElement("td");
    cell.textContent = value;
    row.append(cell);
  }
  return row;
}

function describe(request) {
  const status = text.status[request.status] || request.status;
  return text.askingNow(status, request.seconds, request.completion_tokens);
}

function showKeys(data) {
  const asking = new Map(data.asking.map((request) => [request.key, request]));
  const rows = Object.entries(data.keys).map(([name, tally]) => {
    const now = asking.get(name);
    const cells = [
      name,
      tally.requests,
      tally.prompt_tokens + tally.completion_tokens,
      new Date(tally.last_seen * 1000).toLocaleTimeString(navigator.language),
      now ? describe(now) : "",
    ];
    return tableRow(cells, now);
  });
  // A key asking for the first time has no tally yet: it shows up asking.
  for (const [name, now] of asking) {
    if (!(name in data.keys)) {
      rows.push(tableRow([name, 0, 0, "", describe(now)], now));
    }
  }
  document.querySelector("#keys tbody").replaceChildren(...rows);
}

function show(data) {
  byId("running").textContent = total(data, "tutorial_api_requests_running");
  byId("waiting").textContent = total(data, "tutorial_api_requests_waiting");
  // A chat's tokens join the counter when it ends: until then, the dashboard counts them live.
  const live = data.asking.reduce((sum, request) => sum + request.completion_tokens, 0);
  const tokens = total(data, "tutorial_api_completion_tokens_total") + live;
  if (previous) {
    const rate = (tokens - previous.tokens) / (data.time - previous.time);
    rates.push([data.time, rate]);
    while (rates.length && rates[0][0] < data.time - CHART_SECONDS) {
      rates.shift();
    }
    byId("rate").textContent = rate.toFixed(1);
  }
  previous = { time: data.time, tokens };
  byId("first-token").textContent = pair(data, "tutorial_api_time_to_first_token_seconds");
  byId("answer-time").textContent = pair(data, "tutorial_api_request_duration_seconds");
  const refused = samples(data, "tutorial_api_requests_total").filter(
    (sample) => Number(sample.labels.status) >= 400 && !["/dashboard/data", "/sheet/data"].includes(sample.labels.path),
  );
  const byStatus = {};
  for (const sample of refused) {
    byStatus[sample.labels.status] = (byStatus[sample.labels.status] || 0) + sample.value;
  }
  byId("refusals").textContent =
    Object.entries(byStatus)
      .map(([status, count]) => `${status}: ${count}`)
      .join(" · ") || "0";
  showKeys(data);
  drawChart();
  byId("updated").textContent = text.updated(new Date(data.time * 1000).toLocaleTimeString(navigator.language));
}

async function poll() {
  const data = await fetchWithKey("dashboard/data", text);
  if (data === null) {
    return; // polling starts again once a key is saved
  }
  if (data) {
    show(data);
  }
  setTimeout(poll, POLL_MS);
}

askForKey(poll);
translatePage(text);
poll();
