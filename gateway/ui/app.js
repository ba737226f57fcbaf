// The staff page: open work orders and firing alerts, pushed by the gateway (server-sent events).
// Plain browser JavaScript, no build step, nothing loaded from the internet.
"use strict";

const $ = (id) => document.getElementById(id);
const who = $("who");
who.value = localStorage.getItem("iotgw.who") || "";
who.addEventListener("change", () => localStorage.setItem("iotgw.who", who.value.trim()));

let technicians = [];

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
  const response = await fetch(path, {
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
  const response = await fetch(`/api/devices/${encodeURIComponent(id)}/events?limit=25`);
  if (!response.ok) {
    list.replaceChildren(el("li", {}, `could not load: ${response.status}`));
    return;
  }
  const events = await response.json();
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
  const response = await fetch("/api/technicians");
  technicians = response.ok ? await response.json() : [];
}

function connect() {
  const live = $("live");
  const source = new EventSource("/api/stream");
  source.addEventListener("snapshot", (message) => render(JSON.parse(message.data)));
  source.onopen = () => { live.textContent = "live"; live.className = "live on"; };
  // EventSource reconnects by itself; say so meanwhile.
  source.onerror = () => { live.textContent = "reconnecting…"; live.className = "live off"; };
}

loadTechnicians().finally(connect);
