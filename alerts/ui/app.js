// The staff page: open work orders and firing alerts, pushed by the gateway (server-sent events).
// Plain browser JavaScript, no build step, nothing loaded from the internet.
"use strict";

const $ = (id) => document.getElementById(id);
const who = $("who");
who.value = localStorage.getItem("iotgw.who") || "";
who.addEventListener("change", () => localStorage.setItem("iotgw.who", who.value.trim()));

let technicians = [];

// The API key: asked for once, kept for this browser session only (sessionStorage).
const KEY = "iotgw.key";
function apiKey() { return sessionStorage.getItem(KEY) || ""; }

function askForKey(message) {
  $("login-message").textContent = message;
  $("login").hidden = false;
  $("key").focus();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  $("key").value = "";
  $("login").hidden = true;
  start();
});

$("signout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  stopStream();
  askForKey("Signed out. Enter an API key to continue.");
});

// Every API call carries the key; a 401 asks for another one.
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${apiKey()}` };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    stopStream();
    askForKey("That API key was not accepted. Enter a valid one.");
  }
  return response;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);  // text stays text
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function me() {
  const name = who.value.trim();
  if (!name) {
    showError("Enter your name first (top right): every action records who did it.");
    who.focus();
    return null;
  }
  return name;
}

async function post(path, body) {
  const response = await api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    const problem = await response.json().catch(() => ({}));
    showError(problem.detail || `${response.status} ${response.statusText}`);
    return false;
  }
  showError("");
  return true;  // the change comes back through the event stream
}

function ago(iso) {
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.max(s, 0)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function deviceLink(id) {
  return el("button", { class: "device", type: "button", onclick: () => showDevice(id) }, id);
}

function alertCard(a) {
  const actions = el("div", { class: "actions" });
  if (a.status === "firing" || a.status === "flapping") {
    actions.append(el("button", { class: "primary", "data-action": "ack", onclick: () => {
      const by = me();
      if (by) post(`/api/alerts/${a.id}/ack`, { by });
    } }, "Acknowledge"));
  }
  actions.append(el("button", { "data-action": "resolve", onclick: () => {
    const by = me();
    if (!by) return;
    const note = prompt("Why is it resolved?");
    if (note) post(`/api/alerts/${a.id}/resolve`, { by, note });
  } }, "Resolve"));
  return el("li", { class: `card ${a.severity}`, "data-alert": a.id, "data-status": a.status },
    el("div", { class: "top" }, el("span", { class: `badge ${a.severity}` }, a.severity),
      el("strong", {}, a.rule), el("span", { class: "meta status" }, a.status)),
    el("p", { class: "summary" }, a.summary),
    el("div", { class: "meta" }, deviceLink(a.device_id), ` · ${a.site || "no site"} · fired ${ago(a.fired_at)}`,
      a.acked_by ? ` · acknowledged by ${a.acked_by}` : ""),
    actions);
}

function orderCard(o) {
  const actions = el("div", { class: "actions" });
  const step = (label, path, primary = false) => el("button", {
    class: primary ? "primary" : "", "data-action": path,
    onclick: () => { const by = me(); if (by) post(`/api/work-orders/${o.id}/${path}`, { by }); },
  }, label);
  if (o.status === "assigned") actions.append(step("Acknowledge", "ack", true));
  if (["assigned", "acknowledged"].includes(o.status)) actions.append(step("En route", "en-route"));
  if (["assigned", "acknowledged", "en_route"].includes(o.status)) actions.append(step("On site", "on-site"));
  actions.append(el("button", { "data-action": "resolve", onclick: () => resolveOrder(o) }, "Resolve"));
  const pick = el("select", { "aria-label": "reassign to" }, el("option", { value: "" }, "Reassign to…"));
  for (const t of technicians) pick.append(el("option", { value: t.technician.id },
    `${t.technician.name} (${t.technician.role}${t.on_shift ? "" : ", off shift"})`));
  pick.addEventListener("change", () => {
    const by = me();
    if (by && pick.value) post(`/api/work-orders/${o.id}/reassign`, { by, to: pick.value });
    pick.value = "";
  });
  actions.append(pick);
  const deadline = o.ack_deadline && o.status === "assigned"
    ? countdown(el("span", { "data-deadline": o.ack_deadline })) : null;
  return el("li", { class: `card ${o.priority}`, "data-order": o.id, "data-status": o.status },
    el("div", { class: "top" }, el("span", { class: `badge ${o.priority}` }, o.priority),
      el("strong", {}, `#${o.id}`), el("span", { class: "meta status" }, o.status.replace("_", " "))),
    el("p", { class: "summary" }, o.summary),
    el("div", { class: "meta" }, deviceLink(o.device_id), ` · ${o.site || "no site"} · `,
      o.assignee ? `assigned to ${o.assignee} (level ${o.level + 1})` : "nobody on shift yet", deadline,
      o.recovered_at ? el("span", { class: "recovered" }, " · device recovered") : null),
    actions);
}

function countdown(span) {
  const left = Math.round((Date.parse(span.dataset.deadline) - Date.now()) / 1000);
  span.className = left < 0 ? "overdue" : "";
  span.textContent = left < 0 ? " · acknowledgement overdue"
    : ` · acknowledge within ${left >= 120 ? `${Math.floor(left / 60)} min` : `${left} s`}`;
  return span;
}
setInterval(() => document.querySelectorAll("[data-deadline]").forEach(countdown), 1000);

function resolveOrder(o) {
  const by = me();
  if (!by) return;
  const dialog = $("resolve");
  const form = $("resolve-form");
  form.reset();
  $("resolve-id").textContent = `#${o.id}`;
  dialog.onclose = () => {
    if (dialog.returnValue !== "ok") return;
    post(`/api/work-orders/${o.id}/resolve`, { by, problem: form.problem.value, action: form.action.value });
  };
  dialog.showModal();
}

async function showDevice(id) {
  $("device-id").textContent = id;
  const list = $("device-events");
  list.replaceChildren(el("li", {}, "loading…"));
  $("device").showModal();
  const response = await api(`/api/devices/${encodeURIComponent(id)}/events?limit=25`);
  if (!response.ok) {
    list.replaceChildren(el("li", {}, `could not load: ${response.status}`));
    return;
  }
  const events = (await response.json()).items;
  list.replaceChildren(...events.map((e) => el("li", {},
    el("strong", {}, e.type), ` ${new Date(e.time).toLocaleString()} `,
    el("span", { class: "meta" }, JSON.stringify(e.data).slice(0, 160)))));
  if (!events.length) list.append(el("li", {}, "no events"));
}

function render(snapshot) {
  $("orders").replaceChildren(...snapshot.work_orders.map(orderCard));
  $("alerts").replaceChildren(...snapshot.alerts.map(alertCard));
  $("orders-n").textContent = snapshot.work_orders.length;
  $("alerts-n").textContent = snapshot.alerts.length;
  $("orders-empty").hidden = snapshot.work_orders.length > 0;
  $("alerts-empty").hidden = snapshot.alerts.length > 0;
}

async function loadTechnicians() {
  const response = await api("/api/technicians");
  technicians = response.ok ? (await response.json()).items : [];
}

// Server-sent events over fetch (EventSource cannot send the key): a `snapshot` after every change.
let streaming = null;

function stopStream() {
  if (streaming) streaming.abort();
  streaming = null;
}

async function connect() {
  const live = $("live");
  stopStream();
  const controller = new AbortController();
  streaming = controller;
  let delay = 1000;
  while (streaming === controller) {
    try {
      const response = await api("/api/stream", { signal: controller.signal });
      if (!response.ok) throw new Error(`${response.status}`);
      live.textContent = "live"; live.className = "live on";
      delay = 1000;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const lines = block.split("\n");
          if (lines.includes("event: snapshot")) {
            const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
            render(JSON.parse(data));
          }
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return;
    }
    if (streaming !== controller) return;
    live.textContent = "reconnecting…"; live.className = "live off";
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

function start() {
  loadTechnicians().finally(connect);
}

if (apiKey()) start();
else askForKey("This page needs an API key: a technician's to act, a viewer's to watch. " +
  "An administrator creates one with: iotgw apikeys create --role technician --name YOUR-NAME");
