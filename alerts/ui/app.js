// The staff page: open work orders and firing alerts, pushed by the gateway (server-sent events).
// Plain browser JavaScript, no build step, nothing loaded from another host.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "iotgw.key";  // the API key: this browser session only (sessionStorage)
const WHO = "iotgw.who";  // who works here: a technician's id from the roster (localStorage)
const SEVERITY = ["critical", "major", "minor", "warning", "info"];
const NOTE_S = 8;  // how long a card keeps an action's outcome on show
const SOUND = "iotgw.sound";  // "off": silent mode (localStorage)

const state = {
  session: null,  // {name, role, may}: the key's, from /api/session
  technicians: [],  // the roster, from /api/technicians
  online: false,  // the event stream is up
  snapshot: { alerts: [], work_orders: [] },
  notes: new Map(),  // card -> {text, kind, until}: an action's outcome, next to its buttons
  seenP1: null,  // the P1 work orders this page has raised the alarm for (null: none read yet)
  site: null,  // the building the board shows (null: all; "": the devices with no site)
  absolute: new Set(),  // the times tapped to show their date and time (kept across re-renders)
};

// -- the alarm: a trapped passenger is loud (a tone, a notification), or silent (title only) ----

let audio = null;  // made on a click (sign-in, the sound button): browsers start sound on a gesture only

function loud() { return localStorage.getItem(SOUND) !== "off"; }

function showSound() {
  const button = $("sound");
  button.textContent = loud() ? "sound on" : "silent";
  button.setAttribute("aria-pressed", String(loud()));
}

function wakeAudio() {
  try {
    audio = audio || new AudioContext();
    if (audio.state === "suspended") audio.resume();
  } catch (error) { audio = null; }
  if (loud() && "Notification" in window && Notification.permission === "default") Notification.requestPermission();
}

$("sound").addEventListener("click", () => {
  localStorage.setItem(SOUND, loud() ? "off" : "on");
  showSound();
  if (loud()) wakeAudio();
});

function tone() {
  if (!audio || audio.state !== "running") return false;
  const start = audio.currentTime;
  for (let i = 0; i < 3; i += 1) {  // three short beeps
    const osc = audio.createOscillator();
    const gain = audio.createGain();
    osc.frequency.value = 880;
    gain.gain.value = 0.25;
    osc.connect(gain).connect(audio.destination);
    osc.start(start + i * 0.4);
    osc.stop(start + i * 0.4 + 0.25);
  }
  return true;
}

// Every P1 order not alarmed for yet: a tone and a notification when loud; always recorded in
// window.iotgwAlarms (and an `iotgw:alarm` event), for whoever wants to hear of it.
function alarm(orders) {
  const p1 = orders.filter((o) => o.priority === "P1");
  if (state.seenP1 === null) state.seenP1 = new Set();
  for (const o of p1) {
    if (state.seenP1.has(o.id)) continue;
    state.seenP1.add(o.id);
    const sound = loud() && tone();
    let notified = false;
    if (loud() && "Notification" in window && Notification.permission === "granted") {
      new Notification("Passenger trapped", { body: o.summary, tag: `iotgw-order-${o.id}` });
      notified = true;
    }
    const record = { order: o.id, sound, notified, at: new Date().toISOString() };
    window.iotgwAlarms.push(record);
    window.dispatchEvent(new CustomEvent("iotgw:alarm", { detail: record }));
  }
}
window.iotgwAlarms = [];

function apiKey() { return sessionStorage.getItem(KEY) || ""; }

// -- signing in and out: nothing of the board shows without a key the gateway accepted ----------

function askForKey(message, command = "") {
  clearBoard();
  $("login-message").replaceChildren(message, command ? el("code", { class: "command" }, command) : "");
  $("login").hidden = false;
  $("key").focus();
}

function clearBoard() {
  stopStream();
  state.session = null;
  state.snapshot = { alerts: [], work_orders: [] };
  state.notes.clear();
  state.seenP1 = null;
  state.site = null;
  for (const id of ["orders", "alerts", "history", "sites"]) $(id).replaceChildren();
  $("history-note").textContent = "";
  $("history-more").hidden = true;
  for (const id of ["orders-n", "alerts-n"]) $(id).textContent = "0";
  $("board").hidden = true;
  $("session").hidden = true;
  $("offline").hidden = true;
  document.title = "iotgw · staff";
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  wakeAudio();  // this click is the gesture sound needs
  sessionStorage.setItem(KEY, key);
  $("key").value = "";
  start();
});

$("signout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  askForKey("Signed out. Enter an API key to continue.");
});

// Every API call carries the key; a 401 asks for another one.
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${apiKey()}` };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    askForKey("That API key was not accepted. Enter a valid one.");
  }
  return response;
}

async function start() {
  let response;
  try {
    response = await api("/api/session");
  } catch (error) {
    askForKey("The gateway does not answer. Try again in a moment.");
    return;
  }
  if (!response.ok) return;  // 401: asked for another key already
  state.session = await response.json();
  $("login").hidden = true;
  $("session").hidden = false;
  $("board").hidden = false;
  $("role").textContent = `${state.session.role}'s key`;
  await loadTechnicians();
  render();
  connect();
}

// -- who acts: chosen from the roster, not typed ------------------------------------------------

async function loadTechnicians() {
  const response = await api("/api/technicians");
  state.technicians = response.ok ? (await response.json()).items : [];
  const pick = $("who");
  const stored = localStorage.getItem(WHO) || "";
  pick.replaceChildren(el("option", { value: "" }, "choose yourself…"),
    ...state.technicians.map((t) => el("option", { value: t.technician.id },
      `${t.technician.name} (${t.technician.role}${t.on_shift ? "" : ", off shift"})`)));
  pick.value = state.technicians.some((t) => t.technician.id === stored) ? stored : "";
  $("history-assignee").replaceChildren(el("option", { value: "" }, "anyone"),
    ...state.technicians.map((t) => el("option", { value: t.technician.id }, t.technician.name)));
}

$("who").addEventListener("change", () => {
  localStorage.setItem(WHO, $("who").value);
  render();
});

function me() { return $("who").value; }

function nameOf(id) {
  const t = state.technicians.find((x) => x.technician.id === id);
  return t ? t.technician.name : id;
}

function may(role) { return Boolean(state.session && state.session.may.includes(role)); }

// Why this page may not act now ("" when it may): shown next to the disabled buttons.
function blocked() {
  if (!may("technician")) {
    return `This is a ${state.session ? state.session.role : "viewer"}'s key: it may watch, not act ` +
      "(an administrator gives technicians a key of their own).";
  }
  if (!state.online) return "Offline: actions wait until the gateway answers again.";
  if (!me()) return "Choose yourself at the top first: every action records who did it.";
  return "";
}

// -- building the board -------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v === true) node.setAttribute(k, "");
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);  // text stays text
  return node;
}

function ago(iso) {
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.max(s, 0)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

// The local date and time in the gateway's time zone (IOTGW_TIME_ZONE, from /api/session).
function zone() { return (state.session && state.session.time_zone) || "UTC"; }

function localTime(iso) {
  try {
    return new Intl.DateTimeFormat(undefined, { timeZone: zone(), year: "numeric", month: "short", day: "numeric",
      hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short" }).format(new Date(iso));
  } catch (error) {
    return new Date(iso).toISOString();
  }
}

// A time as "4 min ago", ticking, with the local date and time on hover; a tap switches between the two.
function since(iso, prefix = "") {
  const t = el("time", { datetime: iso, "data-since": iso, "data-prefix": prefix, title: localTime(iso),
    "data-absolute": state.absolute.has(iso) });
  t.textContent = sinceText(t);
  t.addEventListener("click", () => {
    if (state.absolute.has(iso)) state.absolute.delete(iso); else state.absolute.add(iso);
    for (const same of document.querySelectorAll(`time[data-since="${iso}"]`)) {
      same.toggleAttribute("data-absolute", state.absolute.has(iso));
      same.textContent = sinceText(same);
    }
  });
  return t;
}

function sinceText(t) {
  return `${t.dataset.prefix}${t.hasAttribute("data-absolute") ? localTime(t.dataset.since) : ago(t.dataset.since)}`;
}

function tick() {
  for (const t of document.querySelectorAll("[data-since]")) t.textContent = sinceText(t);
  for (const span of document.querySelectorAll("[data-deadline]")) countdown(span);
}
setInterval(tick, 1000);

function countdown(span) {
  const left = Math.round((Date.parse(span.dataset.deadline) - Date.now()) / 1000);
  span.className = left < 0 ? "deadline overdue" : "deadline";
  span.textContent = left < 0 ? "acknowledgement overdue"
    : `acknowledge within ${left >= 120 ? `${Math.floor(left / 60)} min` : `${left} s`}`;
  return span;
}

function note(card) {
  const n = state.notes.get(card);
  if (!n || n.until < Date.now()) return el("p", { class: "note", "data-note": card, hidden: true });
  return el("p", { class: `note ${n.kind}`, "data-note": card, role: n.kind === "error" ? "alert" : "status" }, n.text);
}

function setNote(card, text, kind) {
  state.notes.set(card, { text, kind, until: Date.now() + NOTE_S * 1000 });
  const shown = document.querySelector(`[data-note="${card}"]`);
  if (shown) {
    shown.replaceWith(note(card));
    document.querySelector(`[data-note="${card}"]`).scrollIntoView({ block: "nearest" });
  }
}

// A button that acts, disabled (with the reason beside it) when the page may not act now.
function action(card, label, key, run, primary = false) {
  const why = blocked();
  return el("button", { class: primary ? "primary" : "", type: "button", "data-action": key,
    disabled: Boolean(why), title: why || null, onclick: () => run() }, label);
}

async function post(card, path, body, done) {
  setNote(card, "sending…", "pending");
  let response;
  try {
    response = await api(path, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
  } catch (error) {
    setNote(card, "The gateway did not answer: nothing was done. Try again when it is back.", "error");
    return false;
  }
  if (!response.ok) {
    const problem = await response.json().catch(() => ({}));
    setNote(card, `Not done: ${problem.detail || `${response.status} ${response.statusText}`}`, "error");
    return false;
  }
  setNote(card, done, "ok");
  return true;  // the change itself comes back through the event stream
}

function deviceLink(id) {
  return el("button", { class: "device", type: "button", onclick: () => showDevice(id) }, id);
}

function actions(card, buttons) {
  const why = blocked();
  return el("div", { class: "actions" }, ...buttons, why ? el("p", { class: "why" }, why) : null, note(card));
}

function alertCard(a) {
  const card = `alert-${a.id}`;
  const buttons = [];
  if (a.status === "firing" || a.status === "flapping") {
    buttons.push(action(card, "Acknowledge", "ack",
      () => post(card, `/api/alerts/${a.id}/ack`, { by: me() }, `Acknowledged as ${nameOf(me())}.`), true));
  }
  buttons.push(action(card, "Resolve…", "resolve", () => resolveAlert(a)));
  return el("li", { class: `card ${a.severity}`, "data-alert": a.id, "data-status": a.status },
    el("div", { class: "top" }, el("span", { class: `badge ${a.severity}` }, a.severity),
      el("strong", {}, a.rule), el("span", { class: "meta status" }, a.status)),
    el("p", { class: "summary" }, a.summary),
    el("div", { class: "meta" }, deviceLink(a.device_id), ` · ${a.site || "no site"} · `, since(a.fired_at, "fired "),
      a.acked_by ? ` · acknowledged by ${nameOf(a.acked_by)}` : ""),
    actions(card, buttons));
}

// An alert inside its work order: acted on through the order (acknowledging the order
// acknowledges its alerts), so it has no buttons of its own here.
function episodeAlert(a) {
  return el("li", { class: `episode-alert ${a.severity}`, "data-alert": a.id, "data-status": a.status },
    el("span", { class: `badge ${a.severity}` }, a.severity), " ", el("strong", {}, a.rule), " ",
    el("span", { class: "meta" }, a.status.replace("_", " ")), " · ", a.summary, " · ",
    el("span", { class: "meta" }, since(a.fired_at, "fired ")),
    a.acked_by ? el("span", { class: "meta" }, ` · acknowledged by ${nameOf(a.acked_by)}`) : null);
}

function orderCard(o, alertsById) {
  const card = `order-${o.id}`;
  const step = (label, path, done, primary = false) => action(card, label, path,
    () => post(card, `/api/work-orders/${o.id}/${path}`, { by: me() }, done), primary);
  const buttons = [];
  if (o.status === "assigned") {
    buttons.push(step("Acknowledge", "ack", `Acknowledged as ${nameOf(me())}: escalation stopped.`, true));
  }
  if (["assigned", "acknowledged"].includes(o.status)) buttons.push(step("En route", "en-route", "On the way."));
  if (["assigned", "acknowledged", "en_route"].includes(o.status)) buttons.push(step("On site", "on-site", "On site."));
  buttons.push(action(card, "Resolve…", "resolve", () => resolveOrder(o)));
  const why = blocked();
  const pick = el("select", { "aria-label": "reassign to", disabled: Boolean(why) },
    el("option", { value: "" }, "Reassign to…"));
  for (const t of state.technicians) {
    if (t.technician.id === o.assignee) continue;
    pick.append(el("option", { value: t.technician.id },
      `${t.technician.name} (${t.technician.role}${t.on_shift ? "" : ", off shift"})`));
  }
  pick.addEventListener("change", () => reassign(o, pick));
  buttons.push(pick);
  const trapped = o.priority === "P1";
  return el("li", { class: `card ${o.priority}${trapped ? " entrapment" : ""}`, "data-order": o.id, "data-status": o.status },
    trapped ? el("p", { class: "alarm" }, "Passenger trapped") : null,
    el("div", { class: "top" }, el("span", { class: `badge ${o.priority}` }, o.priority),
      el("button", { class: "link-button", type: "button", "data-detail": o.id, "aria-label": `work order #${o.id}: its history`,
        onclick: () => showOrder(o.id) }, `#${o.id}`),
      el("span", { class: "meta status" }, o.status.replace("_", " "))),
    el("p", { class: "summary" }, o.summary),
    trapped ? passenger(o) : null,
    o.ack_deadline && o.status === "assigned" ? countdown(el("p", { "data-deadline": o.ack_deadline })) : null,
    episode(o, alertsById),
    el("div", { class: "meta" }, deviceLink(o.device_id), ` · ${o.site || "no site"} · `, since(o.created_at, "opened "),
      " · ", o.assignee ? `assigned to ${nameOf(o.assignee)} (level ${o.level + 1})` : "nobody on shift yet",
      o.acked_by ? ` · acknowledged by ${nameOf(o.acked_by)}` : "",
      o.recovered_at ? el("span", { class: "recovered" }, " · device recovered") : null),
    actions(card, buttons));
}

// A trapped passenger's facts, live from the device: the load, the floor, the door, since when.
function passenger(o) {
  const d = o.device;
  if (!d) return el("p", { class: "facts" }, "The elevator has not reported its state.");
  const s = d.state || {};
  const facts = [];
  if (s.load_kg !== undefined) facts.push(`${s.load_kg} kg inside`);
  if (s.floor !== undefined) facts.push(`floor ${s.floor}`);
  if (s.door) facts.push(`door ${s.door}`);
  if (!d.online) facts.push("elevator offline");
  if (s.mode !== "fault" || !d.fault_since) {  // running again: what it says now is no trapped passenger's
    return el("p", { class: "facts recovered", "data-facts": o.id },
      `The elevator runs again (${String(s.mode || "unknown").replaceAll("_", " ")}): now ${facts.join(" · ")}. `,
      "Check that nobody is still inside before resolving.");
  }
  return el("p", { class: "facts", "data-facts": o.id }, facts.join(" · "), " · ",
    since(d.fault_since, "fault began "));
}

function episode(o, alertsById) {
  const mine = (o.alert_ids || []).map((id) => alertsById.get(id)).filter(Boolean);
  if (!mine.length) return null;
  return el("ul", { class: "episode", "aria-label": `alerts of work order #${o.id}` },
    ...sortedAlerts(mine).map(episodeAlert));
}

// The board's order: a trapped passenger first, then my orders, then the team's unassigned and
// escalated ones, then the rest; within each, the most urgent priority, then the newest.
function orderRank(o) {
  if (o.priority === "P1") return 0;
  if (me() && o.assignee === me()) return 1;
  if (!o.assignee || o.level > 0) return 2;
  return 3;
}

function sortedOrders(orders) {
  return [...orders].sort((a, b) => orderRank(a) - orderRank(b) || a.priority.localeCompare(b.priority) || b.id - a.id);
}

// Alerts: the most severe first, then the longest firing.
function sortedAlerts(alerts) {
  return [...alerts].sort((a, b) => SEVERITY.indexOf(a.severity) - SEVERITY.indexOf(b.severity) ||
    Date.parse(a.fired_at) - Date.parse(b.fired_at));
}

// The overview by building: per site its trapped passengers, open orders and alerts; a tap shows
// that building alone.
function overview(orders, alone) {
  const sites = new Map();
  const of = (site) => {
    const key = site || "";
    if (!sites.has(key)) sites.set(key, { p1: 0, orders: 0, alerts: 0 });
    return sites.get(key);
  };
  for (const o of orders) {
    of(o.site).orders += 1;
    if (o.priority === "P1") of(o.site).p1 += 1;
  }
  for (const a of alone) of(a.site).alerts += 1;
  if (state.site !== null && !sites.has(state.site)) state.site = null;  // that building has nothing open now
  const chip = (site, label, counts) => el("button", { type: "button", class: `site${counts && counts.p1 ? " p1" : ""}`,
    "data-site": site === null ? "*" : site, "aria-pressed": String(state.site === site), onclick: () => { state.site = site; render(); } },
    label, counts ? el("span", { class: "meta" }, [counts.p1 ? `${counts.p1} trapped` : "",
      `${counts.orders} order${counts.orders === 1 ? "" : "s"}`,
      `${counts.alerts} alert${counts.alerts === 1 ? "" : "s"}`].filter(Boolean).join(" · ")) : null);
  const names = [...sites.keys()].sort((a, b) => sites.get(b).p1 - sites.get(a).p1 || a.localeCompare(b));
  $("sites").replaceChildren(chip(null, "All buildings"),
    ...names.map((site) => chip(site, site || "no site", sites.get(site))));
  $("sites").hidden = sites.size === 0;
}

function render() {
  if (!state.session) return;
  // One card per fault episode: an alert of an open work order is shown (and acted on) inside it.
  const alertsById = new Map(state.snapshot.alerts.map((a) => [a.id, a]));
  const inOrders = new Set(state.snapshot.work_orders.flatMap((o) => o.alert_ids || []));
  const everyAlone = state.snapshot.alerts.filter((a) => !inOrders.has(a.id));
  overview(state.snapshot.work_orders, everyAlone);
  const here = (x) => state.site === null || (x.site || "") === state.site;
  const orders = state.snapshot.work_orders.filter(here);
  const alone = everyAlone.filter(here);
  $("orders").replaceChildren(...sortedOrders(orders).map((o) => orderCard(o, alertsById)));
  $("alerts").replaceChildren(...sortedAlerts(alone).map(alertCard));
  $("orders-n").textContent = orders.length;
  $("alerts-n").textContent = alone.length;
  $("orders-empty").hidden = orders.length > 0;
  $("alerts-empty").hidden = alone.length > 0;
  // The tab title counts the trapped passengers nobody has acknowledged yet, in every building.
  const waiting = state.snapshot.work_orders.filter((o) => o.priority === "P1" && !o.acked_at).length;
  document.title = waiting ? `(${waiting}) P1 · iotgw · staff` : "iotgw · staff";
}

// -- the actions that ask first --------------------------------------------------------------------

function confirmFirst(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.onclose = () => resolve(dialog.returnValue === "ok");
    dialog.showModal();
  });
}

async function reassign(o, pick) {
  const to = pick.value;
  pick.value = "";
  if (!to) return;
  const t = state.technicians.find((x) => x.technician.id === to);
  const offShift = t && !t.on_shift ? ` ${t.technician.name} is off shift now.` : "";
  if (await confirmFirst(`Reassign #${o.id} to ${nameOf(to)}?${offShift}`)) {
    post(`order-${o.id}`, `/api/work-orders/${o.id}/reassign`, { by: me(), to }, `Reassigned to ${nameOf(to)}.`);
  }
}

function resolveOrder(o) {
  const dialog = $("resolve");
  const form = $("resolve-form");
  form.reset();
  $("resolve-id").textContent = `#${o.id}`;
  const byId = new Map(state.snapshot.alerts.map((a) => [a.id, a]));
  const firing = (o.alert_ids || []).map((id) => byId.get(id)).filter((a) => a && a.status !== "resolved");
  $("resolve-warning").hidden = !firing.length;
  $("resolve-warning").textContent = firing.length ? `Still firing: ${firing.map((a) => a.summary).join("; ")}. ` +
    "The device still reports the fault; resolve only when it is safe (the alert then stays on its own list)." : "";
  dialog.onclose = () => {
    if (dialog.returnValue !== "ok") return;
    post(`order-${o.id}`, `/api/work-orders/${o.id}/resolve`,
      { by: me(), problem: form.problem.value, action: form.action.value }, "Resolved.");
  };
  dialog.showModal();
}

function resolveAlert(a) {
  const dialog = $("resolve-alert");
  const form = $("resolve-alert-form");
  form.reset();
  $("resolve-alert-id").textContent = `${a.rule} on ${a.device_id}`;
  dialog.onclose = () => {
    if (dialog.returnValue !== "ok") return;
    post(`alert-${a.id}`, `/api/alerts/${a.id}/resolve`, { by: me(), note: form.note.value }, "Resolved.");
  };
  dialog.showModal();
}

// A step of a work order as a sentence: "2 min ago: acknowledged by Tina".
function stepText(e) {
  const what = e.kind.replaceAll("_", " ");
  const who = e.by && e.by !== "dispatch" ? ` by ${nameOf(e.by)}` : "";
  const to = e.assignee && ["assigned", "escalated", "reassigned"].includes(e.kind) ? ` to ${nameOf(e.assignee)}` : "";
  const level = e.level !== null && e.level !== undefined && to ? ` (level ${e.level + 1})` : "";
  return `${what}${who}${to}${level}${e.note ? `: ${e.note}` : ""}`;
}

async function showOrder(id) {
  const dialog = $("order-detail");
  $("detail-id").textContent = `#${id}`;
  $("detail-summary").textContent = "loading…";
  for (const list of ["detail-timeline", "detail-alerts", "detail-pages", "detail-device"]) $(list).replaceChildren();
  $("detail-device-h").replaceChildren("Its device's latest events");
  dialog.showModal();
  let response;
  try {
    response = await api(`/api/work-orders/${id}`);
  } catch (error) {
    $("detail-summary").textContent = "The gateway did not answer.";
    return;
  }
  if (!response.ok) {
    $("detail-summary").textContent = `could not load: ${response.status}`;
    return;
  }
  const o = await response.json();
  $("detail-summary").textContent = `${o.priority} · ${o.status.replace("_", " ")} · ${o.summary}`;
  $("detail-timeline").replaceChildren(...o.timeline.map((e) => el("li", { "data-kind": e.kind },
    since(e.at), ": ", stepText(e))));
  $("detail-alerts").replaceChildren(...o.alerts.map((a) => el("li", {},
    el("span", { class: `badge ${a.severity}` }, a.severity), ` ${a.rule}: ${a.summary} · `,
    since(a.attached_at, "attached "), a.resolved_at ? " · resolved" : "")));
  $("detail-pages").replaceChildren(...(o.pages.length ? o.pages.map((p) => el("li", {},
    `${p.receiver}: ${p.status.replaceAll("_", " ")}, ${p.delivery}`,
    p.last_error ? el("span", { class: "meta" }, ` (${p.last_error})`) : null)) : [el("li", {}, "none")]));
  $("detail-device-h").replaceChildren("Latest events of ", deviceLink(o.device_id));
  const events = await getJson(`/api/devices/${encodeURIComponent(o.device_id)}/events?limit=10`);
  $("detail-device").replaceChildren(...(events.body ? eventItems(events.body.items)
    : [el("li", {}, `could not load: ${events.status}`)]));
}

// -- a device: its state now, its latest events as sentences, a sensor's last hour as a chart ------

function seconds(s) {
  if (s === null || s === undefined) return "?";
  return s < 120 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`;
}

// Who did it, when a person did ("dispatch" and "engine" are the gateway's own steps).
function byWhom(by) { return by && by !== "dispatch" && by !== "engine" ? ` by ${nameOf(by)}` : ""; }

// An event as a sentence ("door opened at floor 3"); a type this page does not know, by its name.
function sentence(e) {
  const d = e.data || {};
  const said = {
    "elevator.door.opened": () => `door opened at floor ${d.floor}`,
    "elevator.door.closed": () => `door closed at floor ${d.floor}`,
    "elevator.trip.started": () => `left floor ${d.from_floor} going ${d.direction}`,
    "elevator.trip.completed": () => `went from floor ${d.from_floor} to ${d.to_floor} in ${seconds(d.duration_s)}`,
    "elevator.fault.raised": () => `fault ${d.code} at floor ${d.floor} with ${d.load_kg} kg inside`,
    "elevator.fault.cleared": () => `fault ${d.code} cleared after ${seconds(d.duration_s)}`,
    "elevator.mode.changed": () => `mode changed from ${String(d.from || "unknown").replaceAll("_", " ")} to ` +
      String(d.to).replaceAll("_", " "),
    "elevator.stuck": () => `stuck at floor ${d.floor} with ${d.load_kg} kg inside`,
    "sensor.reading": () => `read ${d.value} ${d.unit}`,
    "device.online": () => "came online",
    "device.offline": () => `went offline${d.reason && d.reason !== "status" ? ` (${d.reason})` : ""}`,
    "device.discovered": () => `seen for the first time${d.type ? ` (${d.type})` : ""}`,
    "device.seq.reset": () => `restarted its message counter (${d.last_seq} to ${d.seq})`,
  }[e.type];
  if (said) return said();
  if (e.type.startsWith("alert.") && d.rule) {
    return `alert ${d.rule} ${String(d.status || "").replaceAll("_", " ")}${byWhom(d.by)}: ${d.summary}`;
  }
  if (e.type.startsWith("workorder.") && d.work_order_id) {
    const to = d.assignee && ["assigned", "escalated", "reassigned"].includes(d.kind) ? ` to ${nameOf(d.assignee)}` : "";
    return `work order #${d.work_order_id} ${String(d.kind || "").replaceAll("_", " ")}${byWhom(d.by)}${to}`;
  }
  return e.type;
}

function eventItems(events) {
  if (!events.length) return [el("li", {}, "no events")];
  return events.map((e) => el("li", { "data-type": e.type }, since(e.time), ": ", sentence(e)));
}

async function getJson(path) {
  try {
    const response = await api(path);
    if (response.ok) return { body: await response.json() };
    const problem = await response.json().catch(() => ({}));
    const detail = typeof problem.detail === "string" ? problem.detail : JSON.stringify(problem.detail || "");
    return { status: `${response.status}${detail ? `: ${detail}` : ""}` };
  } catch (error) {
    return { status: "no answer" };
  }
}

const STATE_FIELDS = [["floor", "Floor"], ["door", "Door"], ["direction", "Direction"], ["mode", "Mode"],
  ["load_kg", "Load (kg)"], ["fault", "Fault"], ["value", "Reading"]];

function stateList(device) {
  const s = device.state || {};
  const rows = [["Type", device.type || "unknown"], ["Site", device.site || "no site"],
    ["Online", device.online ? "yes" : "no"]];
  for (const [key, label] of STATE_FIELDS) {
    if (s[key] === undefined || s[key] === null) continue;
    rows.push([label, key === "value" ? `${s.value} ${s.unit || ""}`.trim() : String(s[key]).replaceAll("_", " ")]);
  }
  const items = rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k.toLowerCase() }, v)]);
  if (device.last_seen) items.push(el("dt", {}, "Last heard"), el("dd", {}, since(device.last_seen)));
  return items;
}

// A sensor's last hour, minute by minute (the analytics consumer's buckets): the mean as a line,
// the minimum and maximum as a band, a minute with no reading as a gap; drawn as SVG, nothing loaded.
function chart(minutes, unit) {
  const W = 320;
  const H = 120;
  const pad = 4;
  const room = 16;  // above and below the line: the labels
  const lo = Math.min(...minutes.map((m) => m.min));
  const hi = Math.max(...minutes.map((m) => m.max));
  const last = minutes[minutes.length - 1];
  const t1 = Date.parse(last.minute);
  const t0 = t1 - 59 * 60000;  // the whole hour ending at the latest minute, however few readings
  const x = (m) => pad + ((Date.parse(m.minute) - t0) / (t1 - t0)) * (W - 2 * pad);
  const y = (v) => H - room - (hi === lo ? 0.5 : (v - lo) / (hi - lo)) * (H - 2 * room);
  const NS = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  // Runs of consecutive minutes: a gap (a silent sensor) is not drawn over.
  const runs = [];
  for (const m of minutes) {
    const run = runs[runs.length - 1];
    if (run && Date.parse(m.minute) - Date.parse(run[run.length - 1].minute) <= 60000) run.push(m);
    else runs.push([m]);
  }
  const svg = node("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `last hour: from ${lo} to ${hi} ${unit}, latest minute's mean ${round2(last.mean)} ${unit}` +
      (runs.length > 1 ? `, ${runs.length - 1} gap${runs.length > 2 ? "s" : ""} with no reading` : "") });
  svg.append(node("rect", { x: pad, y: pad, width: W - 2 * pad, height: H - 2 * pad, class: "frame" }));
  for (const run of runs) {
    svg.append(node("polygon", { class: "band", points: [...run.map((m) => `${x(m)},${y(m.max)}`),
      ...[...run].reverse().map((m) => `${x(m)},${y(m.min)}`)].join(" ") }));
    const points = run.map((m) => `${x(m)},${y(m.mean)}`).join(" ");
    svg.append(run.length > 1 ? node("polyline", { class: "line", points })
      : node("circle", { class: "dot", cx: x(run[0]), cy: y(run[0].mean), r: 2 }));
  }
  const clock = (ms) => new Date(ms).toLocaleTimeString([], { timeZone: zone(), hour: "2-digit", minute: "2-digit" });
  svg.append(node("text", { x: pad + 3, y: pad + 12, class: "label" }, `${hi} ${unit}`),
    node("text", { x: pad + 3, y: H - pad - 3, class: "label" }, `${lo} ${unit}`));
  return el("figure", { class: "chart", "data-points": minutes.length, "data-runs": runs.length }, svg,
    el("div", { class: "axis meta" }, el("span", {}, clock(t0)), el("span", {}, clock(t1))),
    el("figcaption", { class: "meta" }, `The last hour, per minute: the mean, and between ${lo} and ${hi} ${unit}`,
      runs.length > 1 ? "; the gaps are minutes with no reading" : "",
      `; the latest minute's mean ${round2(last.mean)} ${unit}, `, since(last.minute)));
}

function round2(v) { return Math.round(v * 100) / 100; }

async function showDevice(id) {
  $("device-id").textContent = id;
  const list = $("device-events");
  $("device-state").replaceChildren();
  $("device-chart").replaceChildren();
  list.replaceChildren(el("li", {}, "loading…"));
  if (!$("device").open) $("device").showModal();
  const [device, events] = await Promise.all([getJson(`/api/devices/${encodeURIComponent(id)}`),
    getJson(`/api/devices/${encodeURIComponent(id)}/events?limit=25`)]);
  if (!device.body) {
    list.replaceChildren(el("li", {}, device.status === "no answer" ? "The gateway did not answer."
      : `could not load: ${device.status}`));
    return;
  }
  $("device-state").replaceChildren(...stateList(device.body));
  list.replaceChildren(...(events.body ? eventItems(events.body.items) : [el("li", {}, `could not load: ${events.status}`)]));
  if (device.body.type && device.body.type !== "elevator") {
    const figures = await getJson(`/api/analytics/devices/${encodeURIComponent(id)}`);
    const minutes = figures.body && figures.body.minutes ? figures.body.minutes.filter((m) => m.count) : [];
    $("device-chart").replaceChildren(minutes.length ? chart(minutes, (device.body.state || {}).unit || "")
      : el("p", { class: "meta" }, "No readings in the last hour."));
  }
}

// -- history: resolved work orders, searched with the API's filters, a page at a time -------------

let historyCursor = null;

function historyCard(o) {
  return el("li", { class: `card ${o.priority}`, "data-resolved": o.id },
    el("div", { class: "top" }, el("span", { class: `badge ${o.priority}` }, o.priority),
      el("button", { class: "link-button", type: "button", "data-detail": o.id, "aria-label": `work order #${o.id}: its history`,
        onclick: () => showOrder(o.id) }, `#${o.id}`),
      el("span", { class: "meta" }, "resolved "), o.resolved_at ? since(o.resolved_at) : null),
    el("p", { class: "summary" }, o.summary),
    el("div", { class: "meta" }, deviceLink(o.device_id), ` · ${o.site || "no site"} · `, since(o.created_at, "opened "),
      ` · resolved by ${nameOf(o.resolved_by || "")}`,
      o.problem ? ` · found: ${o.problem}` : "", o.action ? ` · done: ${o.action}` : ""));
}

function historyAlertCard(a) {
  return el("li", { class: `card ${a.severity}`, "data-resolved-alert": a.id },
    el("div", { class: "top" }, el("span", { class: `badge ${a.severity}` }, a.severity), el("strong", {}, a.rule),
      el("span", { class: "meta" }, "resolved "), a.resolved_at ? since(a.resolved_at) : null),
    el("p", { class: "summary" }, a.summary),
    el("div", { class: "meta" }, deviceLink(a.device_id), ` · ${a.site || "no site"} · `, since(a.fired_at, "fired "),
      a.acked_by ? ` · acknowledged by ${nameOf(a.acked_by)}` : "",
      a.resolved_by && a.resolved_by !== "engine" ? ` · resolved by ${nameOf(a.resolved_by)}`
        : " · ended by itself (its condition cleared)",
      a.note ? ` · ${a.note}` : ""));
}

// How far the gateway's zone is ahead of UTC at `ms` (milliseconds).
function zoneOffset(ms) {
  const parts = Object.fromEntries(new Intl.DateTimeFormat("en-US", { timeZone: zone(), hourCycle: "h23",
    year: "numeric", month: "numeric", day: "numeric", hour: "numeric", minute: "numeric", second: "numeric" })
    .formatToParts(new Date(ms)).map((p) => [p.type, p.value]));
  const wall = Date.UTC(parts.year, parts.month - 1, parts.day, parts.hour, parts.minute, parts.second);
  return wall - Math.floor(ms / 1000) * 1000;
}

// A day picked in the form, as the start of that day in the gateway's zone (RFC 3339 for the API).
function dayStart(value, next = false) {
  const [y, m, d] = value.split("-").map(Number);
  const wall = new Date(0);
  wall.setUTCFullYear(y, m - 1, d + (next ? 1 : 0));  // years below 100 stay themselves
  let at = wall.getTime() - zoneOffset(wall.getTime());
  at = wall.getTime() - zoneOffset(at);  // the offset at that instant (a change of time that day)
  return new Date(at).toISOString();
}

async function searchHistory(more = false) {
  const form = $("history-form");
  const alerts = form.elements.kind.value === "alerts";
  const params = new URLSearchParams({ status: "resolved", limit: "20" });
  const names = alerts ? ["device_id", "site"] : ["device_id", "site", "priority", "assignee"];
  for (const name of names) {
    const value = form.elements[name].value.trim();
    if (value) params.set(name, value);
  }
  if (form.elements.from.value && form.elements.until.value && form.elements.until.value < form.elements.from.value) {
    $("history").replaceChildren();
    $("history-note").textContent = "The “until” day is before the “from” day: nothing can match.";
    return;
  }
  if (form.elements.from.value) params.set("since", dayStart(form.elements.from.value));
  if (form.elements.until.value) params.set("until", dayStart(form.elements.until.value, true));  // that day included
  if (more && historyCursor) params.set("cursor", historyCursor);
  $("history-note").textContent = "searching…";
  const page = await getJson(`/${alerts ? "api/alerts" : "api/work-orders"}?${params}`);
  if (!page.body) {
    if (!more) $("history").replaceChildren();
    $("history-note").textContent = page.status === "no answer" ? "The gateway did not answer: try again when it is back."
      : `Could not search: ${page.status}`;
    return;
  }
  historyCursor = page.body.next_cursor;
  const cards = page.body.items.map(alerts ? historyAlertCard : historyCard);
  if (more) $("history").append(...cards); else $("history").replaceChildren(...cards);
  const shown = $("history").children.length;
  const what = alerts ? "alert" : "work order";
  $("history-note").textContent = shown ? `${shown} resolved ${what}${shown === 1 ? "" : "s"}`
    : `No resolved ${what} matches.`;
  $("history-more").hidden = !historyCursor;
}

// Priority and assignee are work orders' alone.
$("history-form").elements.kind.addEventListener("change", () => {
  const alerts = $("history-form").elements.kind.value === "alerts";
  for (const name of ["priority", "assignee"]) $("history-form").elements[name].disabled = alerts;
});

$("history-form").addEventListener("submit", (event) => { event.preventDefault(); searchHistory(); });
$("history-more").addEventListener("click", () => searchHistory(true));

// -- the live stream: server-sent events over fetch (EventSource cannot send the key) -----------

let streaming = null;

function stopStream() {
  if (streaming) streaming.abort();
  streaming = null;
  setOnline(false);
}

function setOnline(online) {
  if (state.online === online) return;
  state.online = online;
  const live = $("live");
  live.textContent = online ? "live" : "reconnecting…";
  live.className = online ? "live on" : "live off";
  $("offline").hidden = online || !state.session;
  $("board").classList.toggle("stale", !online);
  render();  // the buttons follow: disabled with the reason while offline
}

async function connect() {
  if (streaming) streaming.abort();
  const controller = new AbortController();
  streaming = controller;
  let delay = 1000;
  while (streaming === controller) {
    try {
      const response = await api("/api/stream", { signal: controller.signal });
      if (!response.ok) throw new Error(`${response.status}`);
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
            state.snapshot = JSON.parse(data);
            alarm(state.snapshot.work_orders);
            if (state.online) render();
            else setOnline(true);  // which renders
          }
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return;
    }
    if (streaming !== controller) return;
    setOnline(false);
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

showSound();
if (apiKey()) start();
else {
  askForKey("This page needs an API key: a technician's to act, a viewer's to watch. An administrator creates one with:",
    "iotgw apikeys create --role technician --name YOUR-NAME");
}
