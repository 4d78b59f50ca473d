// The student sheet: fetched from /sheet/data with a teacher's key (kept in this browser, as the
// dashboard keeps it), shown for the projector, or as one slip per student to print. A slip's link
// carries its key after `#`, which the student's browser never sends to the server.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const QUIET = 4; // modules of white around a QR code, as readers expect

const TEXTS = {
  en: {
    title: "Student sheet",
    print: "Print",
    changeKey: "Change key",
    keyLabel: "Teacher's key",
    keySave: "Save",
    toSlips: "Students' slips",
    toSheet: "Class sheet",
    model: (name) => `model: ${name}`,
    openChat: "Open the chat page in a browser, or scan the code:",
    keyOnce: "Enter the key on your slip once: it stays in your browser.",
    noKey: "This server needs no key.",
    firstCheck: "First check",
    checkText: (address) =>
      `Open ${address}/health in a browser: it names the model. Then open ${address}/docs, ` +
      "click Authorize, paste your key, and try POST / with Try it out.",
    inCode: "In code: replace YOUR_KEY with your key",
    withRequests: "Python with requests (pip install requests)",
    withOpenai: "Python with the openai client (pip install openai)",
    withCurl: "curl on Linux and macOS",
    withPowershell: "Windows PowerShell (curl is another command there)",
    cannotReach:
      "Nobody can connect? The server must listen beyond this machine (serve --host 0.0.0.0), " +
      "and the firewall let its port in: see the runbook's network checklist.",
    slipsHint:
      "One slip per student: print, cut along the dashed lines, hand each student theirs. " +
      "Keep this view off the projector: it shows every key.",
    scan: "Scan, or open this link: it logs you in.",
    yourKey: "Your key, for code:",
    unauthorized: "This key is not accepted (401): enter a teacher's key.",
    forbidden: "This key is a student's (403): the sheet needs a key marked (teacher).",
    unreachable: "The server cannot be reached.",
  },
  zh: {
    title: "学员操作单",
    print: "打印",
    changeKey: "更换密钥",
    keyLabel: "教师密钥",
    keySave: "保存",
    toSlips: "学员纸条",
    toSheet: "全班操作单",
    model: (name) => `模型：${name}`,
    openChat: "用浏览器打开对话页面，或者扫码：",
    keyOnce: "第一次打开时输入纸条上的密钥，之后浏览器会记住它。",
    noKey: "这台服务器不需要密钥。",
    firstCheck: "先检查一下",
    checkText: (address) =>
      `浏览器打开 ${address}/health，能看到模型名就说明通了。再打开 ${address}/docs，` +
      "点 Authorize 填入密钥，在 POST / 上点 Try it out 发一个请求。",
    inCode: "在代码里：把 YOUR_KEY 换成你的密钥",
    withRequests: "Python + requests（pip install requests）",
    withOpenai: "Python + openai 客户端（pip install openai）",
    withCurl: "Linux 和 macOS 上的 curl",
    withPowershell: "Windows PowerShell（它里面的 curl 是另一个命令）",
    cannotReach:
      "谁都连不上？服务必须监听本机以外的地址（serve --host 0.0.0.0），防火墙也要放行它的端口：" +
      "见讲师手册里的网络排查清单。",
    slipsHint: "每位学员一张纸条：打印后沿虚线剪开，发给各自的学员。这个视图上有所有人的密钥，不要投影出来。",
    scan: "扫码或打开这个链接，就自动登录了。",
    yourKey: "你的密钥（写代码时用）：",
    unauthorized: "密钥无效（401）：请输入教师密钥。",
    forbidden: "这是学生的密钥（403）：操作单需要在密钥文件里标为 (teacher) 的密钥。",
    unreachable: "连不上服务器。",
  },
};

const text = TEXTS[language];
let showingSlips = false;


// `address` as a QR code: an SVG square per dark module, labelled with what it encodes.
function qrCode(address) {
  const code = qrcode(0, "M"); // the smallest version that holds it; 15% may be smudged
  code.addData(address);
  code.make();
  const count = code.getModuleCount();
  const size = count + 2 * QUIET;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${size} ${size}`);
  svg.setAttribute("shape-rendering", "crispEdges");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", address);
  const background = document.createElementNS(SVG, "rect");
  background.setAttribute("width", size);
  background.setAttribute("height", size);
  background.setAttribute("fill", "white");
  let squares = "";
  for (let row = 0; row < count; row += 1) {
    for (let column = 0; column < count; column += 1) {
      if (code.isDark(row, column)) {
        squares += `M${column + QUIET} ${row + QUIET}h1v1h-1z`;
      }
    }
  }
  const modules = document.createElementNS(SVG, "path");
  modules.setAttribute("d", squares);
  modules.setAttribute("fill", "black");
  svg.append(background, modules);
  return svg;
}

function element(tag, className, content) {
  const made = document.createElement(tag);
  made.className = className;
  made.textContent = content;
  return made;
}

function slip(student) {
  const card = element("div", "slip", "");
  const words = element("div", "", "");
  words.append(
    element("p", "name", student.name),
    element("p", "", text.scan),
    element("p", "link", student.link),
    element("p", "", text.yourKey),
    element("p", "key", student.key),
  );
  card.append(words, qrCode(student.link));
  return card;
}

function show(data) {
  byId("model").textContent = text.model(data.model);
  byId("address").textContent = `${data.address}/`;
  byId("chat-qr").replaceChildren(qrCode(`${data.address}/`));
  byId("key-once").textContent = data.needs_key ? text.keyOnce : text.noKey;
  byId("first-check").textContent = text.checkText(data.address);
  for (const [tool, code] of Object.entries(data.examples)) {
    byId(`example-${tool}`).textContent = code;
  }
  byId("slip-list").replaceChildren(...data.students.map(slip));
  byId("switch").hidden = !data.students.length;
  showView();
}

function showView() {
  byId("sheet").hidden = showingSlips;
  byId("slips").hidden = !showingSlips;
  byId("switch").textContent = showingSlips ? text.toSheet : text.toSlips;
}

async function load() {
  const data = await fetchWithKey("sheet/data", text, { cache: "no-store" });
  if (data) {
    show(data);
  }
}

askForKey(load);
byId("switch").addEventListener("click", () => {
  showingSlips = !showingSlips;
  showView();
});

byId("print").addEventListener("click", () => window.print());

translatePage(text);
byId("in-code").textContent = text.inCode;
load();
