// What the teacher's pages (the dashboard, the student sheet) share: the page's language, the
// teacher's key kept in this browser, and the page's data fetched with it, a refusal explained.
"use strict";

const KEY_STORE = "tutorial_api.teacher_key";
const language = navigator.language.toLowerCase().startsWith("zh") ? "zh" : "en";
const byId = (id) => document.getElementById(id);

function translatePage(text) {
  document.documentElement.lang = language === "zh" ? "zh-CN" : "en";
  for (const element of document.querySelectorAll("[data-text]")) {
    element.textContent = text[element.dataset.text];
  }
}

function notify(message) {
  byId("notice").textContent = message;
  byId("notice").hidden = !message;
}

function showKeyForm() {
  byId("key-form").hidden = false;
  byId("key").focus();
}

// The page's data from `path`, fetched with the teacher's key. null when the key is refused (the
// key form is then shown), undefined when the server cannot be reached; either is explained.
async function fetchWithKey(path, text, options = {}) {
  const key = localStorage.getItem(KEY_STORE);
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  try {
    const response = await fetch(path, { ...options, headers });
    if (!response.ok) {
      notify(response.status === 403 ? text.forbidden : text.unauthorized);
      showKeyForm();
      return null;
    }
    notify("");
    return await response.json();
  } catch {
    notify(text.unreachable);
    return undefined;
  }
}

// Keep the key the teacher types, then run `load` again; "Change key" shows the form.
function askForKey(load) {
  byId("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORE, byId("key").value.trim());
    byId("key").value = "";
    byId("key-form").hidden = true;
    load();
  });
  byId("change-key").addEventListener("click", showKeyForm);
}
