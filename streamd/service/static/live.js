// The live view: one tile per camera, updated from the daemon's WebSocket. Pictures are
// fetched one at a time per tile (a new one only after the last has loaded) and at most
// PICTURES_PER_S a second, so a slow network shows fewer frames instead of queueing them and
// many viewers of many cameras cost the daemon little encoding.
"use strict";

const PICTURES_PER_S = 2;

const grid = document.getElementById("grid");
const template = document.getElementById("tile");
const conn = document.getElementById("conn");
const tiles = new Map();

function tile(id) {
  let t = tiles.get(id);
  if (t) return t;
  const el = template.content.firstElementChild.cloneNode(true);
  el.dataset.camera = id;
  el.querySelector("h2").textContent = id;
  const img = el.querySelector("img");
  img.alt = `latest picture from ${id}`;
  t = { el, img, frame: null, shown: null, loading: false, last: 0, timer: null };
  tiles.set(id, t);
  const ids = [...tiles.keys()].sort();
  grid.insertBefore(el, tiles.get(ids[ids.indexOf(id) + 1])?.el ?? null);
  return t;
}

function showFrame(id, frame) {
  const t = tile(id);
  t.frame = frame;
  if (t.loading || t.timer || t.shown === frame) return;
  const wait = t.last + 1000 / PICTURES_PER_S - Date.now();
  if (wait > 0) {
    t.timer = setTimeout(() => { t.timer = null; showFrame(id, t.frame); }, wait);
    return;
  }
  t.loading = true;
  t.last = Date.now();
  const next = new Image();
  next.onload = () => {
    t.img.src = next.src;
    t.shown = frame;
    t.el.dataset.frame = String(frame);
    // How many pictures this tile has shown: the page's own record that it keeps updating.
    t.el.dataset.shown = String(Number(t.el.dataset.shown || 0) + 1);
    t.loading = false;
    if (t.frame !== t.shown) showFrame(id, t.frame);
  };
  next.onerror = () => { t.loading = false; };
  next.src = `api/v1/cameras/${encodeURIComponent(id)}/latest.jpg?frame=${frame}`;
}

function setText(t, cls, value) { t.el.querySelector(cls).textContent = value; }

function updateCamera(c) {
  const t = tile(c.id);
  t.el.dataset.state = c.state;
  setText(t, ".state", c.state);
  setText(t, ".fps", c.fps.toFixed(1));
  setText(t, ".latency", c.latency_ms == null ? "-" : `${Math.round(c.latency_ms)} ms`);
  setText(t, ".drops", String(c.dropped));
  setText(t, ".objects", String(c.detections));
  setText(t, ".error", c.last_error || "");
  if (c.frame != null) showFrame(c.id, c.frame);
}

function onMessage(msg) {
  if (msg.type === "cameras") {
    msg.cameras.forEach(updateCamera);
    document.getElementById("uptime").textContent = `up ${Math.round(msg.uptime_s)} s`;
  } else if (msg.type === "detections") {
    setText(tile(msg.camera), ".objects", String(msg.detections.length));
    showFrame(msg.camera, msg.frame);
  } else if (msg.type === "health") {
    const t = tile(msg.camera);
    t.el.dataset.state = msg.state;
    setText(t, ".state", msg.state);
    setText(t, ".error", msg.state === "streaming" ? "" : msg.reason || "");
  }
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/api/v1/ws?types=cameras,detections,health`);
  conn.dataset.state = "connecting";
  conn.textContent = "connecting";
  ws.onopen = () => { conn.dataset.state = "open"; conn.textContent = "live"; };
  ws.onmessage = (ev) => {
    document.body.dataset.messages = String(Number(document.body.dataset.messages || 0) + 1);
    onMessage(JSON.parse(ev.data));
  };
  ws.onclose = () => {
    conn.dataset.state = "closed";
    conn.textContent = "reconnecting";
    setTimeout(connect, 2000);
  };
}

// A daemon with a token answers 401 until the browser holds it as a cookie (same-site only).
function askForToken() {
  const form = document.getElementById("login");
  form.hidden = false;
  conn.dataset.state = "closed";
  conn.textContent = "token needed";
  form.onsubmit = (ev) => {
    ev.preventDefault();
    const secure = location.protocol === "https:" ? "; Secure" : "";
    document.cookie = `streamd_token=${form.token.value.trim()}; path=/; SameSite=Strict${secure}`;
    location.reload();
  };
}

fetch("api/v1/cameras").then((r) => {
  if (r.status === 401) { askForToken(); return; }
  connect();
  return r.json().then((body) => body.cameras.forEach(updateCamera));
}).catch(() => connect());
