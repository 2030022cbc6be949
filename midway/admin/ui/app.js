// midway's dashboard: plain JavaScript over the documented admin API.
//
// Every second it reads GET /proxies, GET /metrics (Prometheus text, parsed
// below) and GET /connections, and redraws.  Rates are differences between
// successive /metrics polls, kept for WINDOW_S.  A failed poll shows the
// "disconnected" banner; the next good one clears it.  A 401 asks for the
// admin token, kept in sessionStorage and sent as a Bearer header.  Every
// request carries X-Midway-UI, without which the API answers a browser 403.
"use strict";

const POLL_MS = 1000;
const WINDOW_S = 300;          // the graphs show the last 5 minutes
const TOKEN_KEY = "midway-token";
const CONNECTIONS_RETRY_POLLS = 10;

const state = {
  proxies: {},                 // name -> proxy JSON from GET /proxies
  history: {},                 // name -> [{t, up, down, conns}] rates per second
  last: null,                  // {t, metrics} of the previous poll
  connections: null,           // list, or null when /connections is not available
  polls: 0,
  toxicTypes: [],
  sort: { key: "age_s", asc: false },
  editing: {},                 // proxy name -> toxic name being edited
};

// -- the admin API ----------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { "X-Midway-UI": "1" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  if (response.status === 401) askToken();
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  // A 204's (empty) body is read all the same: a response left unread is
  // cancelled, which the browser's network panel shows as a failed request.
  if (response.status === 204) { await response.text(); return null; }
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response.text();
}

function askToken() {
  const form = document.getElementById("token-form");
  if (!form.hidden) return;
  sessionStorage.removeItem(TOKEN_KEY);
  form.hidden = false;
  document.getElementById("token").focus();
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
  event.target.hidden = true;
  loadToxicTypes();
});

// -- Prometheus text: `name{label="value",...} number` lines ------------------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    for (const m of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[m[1]] = m[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

function sum(samples, name, labels) {
  let total = 0;
  for (const s of samples) {
    if (s.name !== name) continue;
    if (Object.entries(labels).every(([k, v]) => s.labels[k] === v)) total += s.value;
  }
  return total;
}

function byLabel(samples, name, proxy, label) {
  const out = {};
  for (const s of samples) {
    if (s.name === name && s.labels.proxy === proxy && s.value > 0) out[s.labels[label]] = s.value;
  }
  return out;
}

// -- polling -----------------------------------------------------------------

async function poll() {
  try {
    const [proxies, metricsText] = await Promise.all([api("GET", "/proxies"),
                                                      api("GET", "/metrics")]);
    state.proxies = proxies;
    record(parseMetrics(metricsText));
    // After a 404 (a midway without /connections) ask again only now and then:
    // each 404 is a line in the browser's console.
    if (state.connections !== null || state.polls % CONNECTIONS_RETRY_POLLS === 0) {
      try {
        state.connections = await api("GET", "/connections");
      } catch (e) {
        if (!(e instanceof ApiError && e.status === 404)) throw e;
        state.connections = null;  // not in this midway: said so, not an error
      }
    }
    state.polls++;
    setConnected(true);
    render();
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) setConnected(false, e);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function record(metrics) {
  const now = Date.now() / 1000;
  const previous = state.last;
  state.last = { t: now, metrics };
  state.samples = metrics;
  if (!previous) return;
  const dt = now - previous.t;
  for (const name of Object.keys(state.proxies)) {
    // A counter that went down (a worker restarted) counts as 0, not negative.
    const rate = (metric, labels) => Math.max(0, (sum(metrics, metric, labels)
      - sum(previous.metrics, metric, labels)) / dt);
    const history = state.history[name] || (state.history[name] = []);
    history.push({
      t: now,
      up: rate("midway_bytes_total", { proxy: name, direction: "upstream" }),
      down: rate("midway_bytes_total", { proxy: name, direction: "downstream" }),
      conns: rate("midway_connections_total", { proxy: name }),
    });
    while (history.length && history[0].t < now - WINDOW_S) history.shift();
  }
}

function setConnected(ok, error) {
  const banner = document.getElementById("banner");
  document.body.dataset.connected = ok ? "true" : "false";
  document.getElementById("status").textContent = ok ? "connected" : "disconnected";
  if (ok) {
    banner.hidden = true;
    state.downSince = null;
    return;
  }
  state.downSince = state.downSince || new Date();
  banner.hidden = false;
  banner.textContent = `disconnected: midway at ${location.host} does not answer since `
    + `${state.downSince.toLocaleTimeString()} (${error && error.message}); retrying every second`;
}

async function loadToxicTypes() {
  try {
    state.toxicTypes = await api("GET", "/toxic-types");
    const version = await api("GET", "/version");
    document.getElementById("version").textContent = `midway ${version.midway || ""}`;
  } catch (e) {
    setTimeout(loadToxicTypes, POLL_MS);
    return;
  }
  for (const section of document.querySelectorAll("section.proxy")) fillTypes(section);
}

// -- drawing -----------------------------------------------------------------

function el(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  return node;
}

// The page redraws its rows each second: a button with the focus (reached
// with Tab) would lose it at every redraw.  Buttons in redrawn rows carry a
// data-focus key; after a redraw the new button with the same key gets the
// focus back.
function keepFocus(redraw) {
  const key = document.activeElement && document.activeElement.dataset
    && document.activeElement.dataset.focus;
  redraw();
  if (!key || document.activeElement.dataset.focus === key) return;
  const again = document.querySelector(`[data-focus="${CSS.escape(key)}"]`);
  if (again) again.focus();
}

function formatBytes(n, suffix = "") {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}${suffix}`;
}

// An upstream's last_check (docs/balancing.md): null before the first active
// check or with checks off, else its time (Unix seconds), passed and reason.
function formatCheck(check) {
  if (!check) return "none";
  const when = new Date(check.at * 1000).toLocaleTimeString();
  return check.passed ? `${when} ok` : `${when} failed (${check.reason || "no reason given"})`;
}

function render() {
  const box = document.getElementById("proxies");
  const names = Object.keys(state.proxies).sort();
  for (const section of box.querySelectorAll("section.proxy")) {
    if (!names.includes(section.dataset.proxy)) section.remove();
  }
  keepFocus(() => {
    for (const name of names) renderProxy(box, state.proxies[name]);
  });
  // A proxy added live (a reload, POST /proxies) takes its place in name order;
  // sections are moved only when out of order (moving one loses a form's focus).
  const shown = [...box.querySelectorAll("section.proxy")].map((s) => s.dataset.proxy);
  if (shown.join("\n") !== names.join("\n")) {
    for (const name of names) {
      box.append(box.querySelector(`section.proxy[data-proxy="${CSS.escape(name)}"]`));
    }
  }
  keepFocus(() => renderConnections(names));
}

function renderProxy(box, proxy) {
  let section = box.querySelector(`section.proxy[data-proxy="${CSS.escape(proxy.name)}"]`);
  if (!section) section = newProxySection(box, proxy.name);
  section.querySelector(".name").textContent = proxy.name;
  section.querySelector(".addresses").textContent = `${proxy.listen} → ${proxy.upstream}`;
  section.querySelector(".enabled").textContent = proxy.enabled ? "" : "(disabled)";

  const upstreams = section.querySelector("table.upstreams");
  upstreams.hidden = !Array.isArray(proxy.upstreams);
  if (!upstreams.hidden) {
    upstreams.tBodies[0].replaceChildren(...proxy.upstreams.map((u) => {
      const row = el("tr");
      const up = u.state === "up";
      // An SNI route's upstream has its own health: say whose it is.
      const where = u.route == null ? u.address : `${u.address} (route ${u.route})`;
      row.append(el("td", where), el("td", up ? "up" : "down", up ? {} : { class: "down-state" }),
                 el("td", u.weight), el("td", u.backup ? "yes" : ""), el("td", u.active),
                 el("td", formatCheck(u.last_check)));
      return row;
    }));
  }

  const history = state.history[proxy.name] || [];
  const now = history.length ? history[history.length - 1] : { up: 0, down: 0, conns: 0 };
  section.dataset.rateUp = now.up.toFixed(0);
  section.dataset.rateDown = now.down.toFixed(0);
  section.dataset.connRate = now.conns.toFixed(2);
  section.querySelector(".rate-up").textContent = formatBytes(now.up, "/s");
  section.querySelector(".rate-down").textContent = formatBytes(now.down, "/s");
  section.querySelector(".rate-conns").textContent = now.conns.toFixed(1);
  section.querySelector(".active").textContent =
    sum(state.samples || [], "midway_connections_active", { proxy: proxy.name });
  drawGraph(section.querySelector("canvas.bytes"), history,
            [["up", "--up"], ["down", "--down"]], (v) => formatBytes(v, "/s"));
  drawGraph(section.querySelector("canvas.conns"), history, [["conns", "--up"]],
            (v) => `${v.toFixed(1)}/s`);

  const reasons = byLabel(state.samples || [], "midway_closes_total", proxy.name, "reason");
  section.querySelector(".reasons").textContent = "closes: " + (Object.keys(reasons).length
    ? Object.entries(reasons).map(([r, n]) => `${r} ${n}`).join(", ") : "none yet");

  renderToxics(section, proxy);
}

function newProxySection(box, name) {
  const section = document.getElementById("proxy-template").content.firstElementChild.cloneNode(true);
  section.dataset.proxy = name;
  const form = section.querySelector(".toxic-form");
  form.elements.type.addEventListener("change", () => fillAttributes(form));
  form.addEventListener("submit", (event) => { event.preventDefault(); submitToxic(section); });
  form.querySelector(".cancel").addEventListener("click", () => stopEditing(section));
  fillTypes(section);
  box.append(section);
  return section;
}

function drawGraph(canvas, history, series, format) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const style = getComputedStyle(document.documentElement);
  ctx.clearRect(0, 0, width, height);
  const end = Date.now() / 1000;
  let top = 0;
  for (const point of history) for (const [key] of series) top = Math.max(top, point[key]);
  top = top || 1;
  ctx.fillStyle = "#6b7280";
  ctx.font = "11px sans-serif";
  ctx.fillText(`max ${format(top)}`, 4, 12);
  ctx.fillText("5 min", 4, height - 4);
  for (const [key, color] of series) {
    ctx.strokeStyle = style.getPropertyValue(color).trim();
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    history.forEach((point, i) => {
      const x = width - ((end - point.t) / WINDOW_S) * width;
      const y = height - 2 - (point[key] / top) * (height - 18);
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    ctx.stroke();
  }
}

// -- toxics --------------------------------------------------------------------

function fillTypes(section) {
  const select = section.querySelector(".toxic-form").elements.type;
  if (select.options.length || !state.toxicTypes.length) return;
  for (const t of state.toxicTypes) select.append(el("option", t.type));
  fillAttributes(section.querySelector(".toxic-form"));
}

function fillAttributes(form, values = {}) {
  const type = state.toxicTypes.find((t) => t.type === form.elements.type.value);
  const box = form.querySelector(".attributes");
  box.replaceChildren();
  if (!type) return;
  form.querySelector(".doc").textContent = type.doc;
  for (const a of type.attributes) {
    const input = el("input", null, {
      type: "number", name: "attr-" + a.name, min: a.minimum, step: a.integer ? 1 : "any",
      value: values[a.name] ?? a.default, title: a.doc,
    });
    if (a.maximum !== null) input.max = a.maximum;
    const label = el("label", `${a.name} `);
    label.append(input, ` ${a.unit}`);
    box.append(label);
  }
}

function renderToxics(section, proxy) {
  const rows = proxy.toxics.map((toxic) => {
    const row = el("tr", null, { "data-toxic": toxic.name });
    const attributes = Object.entries(toxic.attributes).map(([k, v]) => `${k}=${v}`).join(", ");
    const key = `${proxy.name}\n${toxic.name}`;
    const edit = el("button", "edit", { class: "edit", "data-focus": `edit\n${key}`,
                                        "aria-label": `edit toxic ${toxic.name} of ${proxy.name}` });
    edit.addEventListener("click", () => startEditing(section, toxic));
    const remove = el("button", "remove", { class: "remove", "data-focus": `remove\n${key}`,
                                            "aria-label": `remove toxic ${toxic.name} of ${proxy.name}` });
    remove.addEventListener("click", () => removeToxic(section, proxy.name, toxic.name));
    const actions = el("td");
    actions.append(edit, " ", remove);
    row.append(el("td", toxic.name), el("td", toxic.type), el("td", toxic.stream),
               el("td", toxic.toxicity), el("td", attributes), actions);
    return row;
  });
  section.querySelector("table.toxics").tBodies[0].replaceChildren(...rows);
}

function startEditing(section, toxic) {
  const form = section.querySelector(".toxic-form");
  state.editing[section.dataset.proxy] = toxic.name;
  form.elements.type.value = toxic.type;
  form.elements.stream.value = toxic.stream;
  form.elements.toxicity.value = toxic.toxicity;
  form.elements.name.value = toxic.name;
  for (const field of [form.elements.type, form.elements.stream, form.elements.name,
                       form.elements.connection]) field.disabled = true;
  form.elements.connection.value = "";
  fillAttributes(form, toxic.attributes);
  form.querySelector(".submit").textContent = "update toxic";
  form.querySelector(".cancel").hidden = false;
}

function stopEditing(section) {
  const form = section.querySelector(".toxic-form");
  delete state.editing[section.dataset.proxy];
  for (const field of [form.elements.type, form.elements.stream, form.elements.name,
                       form.elements.connection]) field.disabled = false;
  form.elements.name.value = "";
  form.querySelector(".submit").textContent = "add toxic";
  form.querySelector(".cancel").hidden = true;
  fillAttributes(form);
}

async function submitToxic(section) {
  const form = section.querySelector(".toxic-form");
  const proxy = section.dataset.proxy;
  const attributes = {};
  for (const input of form.querySelectorAll(".attributes input")) {
    attributes[input.name.slice(5)] = Number(input.value);
  }
  const body = { toxicity: Number(form.elements.toxicity.value), attributes };
  const editing = state.editing[proxy];
  const connection = form.elements.connection.value.trim();
  const error = form.querySelector(".error");
  error.textContent = "";
  try {
    const base = connection && !editing
      ? `/connections/${encodeURIComponent(connection)}/toxics`
      : `/proxies/${encodeURIComponent(proxy)}/toxics`;
    if (editing) {
      await api("POST", `${base}/${encodeURIComponent(editing)}`, body);
      stopEditing(section);
    } else {
      Object.assign(body, { type: form.elements.type.value, stream: form.elements.stream.value });
      if (form.elements.name.value) body.name = form.elements.name.value;
      await api("POST", base, body);
      form.elements.connection.value = "";  // the next one is the proxy's unless asked again
    }
  } catch (e) {
    error.textContent = e.message;
  }
}

async function removeToxic(section, proxy, toxic) {
  try {
    await api("DELETE", `/proxies/${encodeURIComponent(proxy)}/toxics/${encodeURIComponent(toxic)}`);
    if (state.editing[proxy] === toxic) stopEditing(section);
  } catch (e) {
    section.querySelector(".toxic-form .error").textContent = e.message;
  }
}

// -- connections ---------------------------------------------------------------

const COLUMNS = ["id", "proxy", "client", "upstream", "age_s", "bytes_up", "bytes_down", "state", "path"];

function renderConnections(names) {
  const select = document.getElementById("conn-proxy");
  const options = [...select.options].slice(1).map((o) => o.value);
  if (options.join() !== names.join()) {
    const chosen = select.value;
    select.replaceChildren(el("option", "all", { value: "" }), ...names.map((n) => el("option", n)));
    select.value = names.includes(chosen) ? chosen : "";
  }
  const status = document.getElementById("conn-status");
  const body = document.querySelector("#connections tbody");
  if (state.connections === null) {
    status.textContent = "connections: not available (this midway has no GET /connections)";
    body.replaceChildren();
    return;
  }
  const proxy = select.value;
  const words = document.getElementById("conn-filter").value.trim().toLowerCase();
  const { key, asc } = state.sort;
  const shown = state.connections
    .filter((c) => !proxy || c.proxy === proxy)
    .filter((c) => !words || COLUMNS.some((k) => String(c[k] ?? "").toLowerCase().includes(words)))
    .sort((a, b) => {
      const x = a[key], y = b[key];
      const order = typeof x === "number" && typeof y === "number" ? x - y
        : String(x ?? "").localeCompare(String(y ?? ""));
      return asc ? order : -order;
    });
  status.textContent = `${shown.length} of ${state.connections.length} shown`
    + (state.notice && state.notice.until > Date.now() ? ` · ${state.notice.text}` : "");
  body.replaceChildren(...shown.map((c) => {
    const row = el("tr", null, { "data-id": c.id });
    row.append(el("td", c.id), el("td", c.proxy), el("td", c.client), el("td", c.upstream),
               el("td", `${Number(c.age_s).toFixed(1)} s`), el("td", formatBytes(c.bytes_up)),
               el("td", formatBytes(c.bytes_down)), el("td", c.state), el("td", c.path),
               connectionToxics(c));
    const kill = el("button", "kill", { class: "kill", "data-focus": `kill\n${c.id}`,
                                        "aria-label": `kill connection ${c.id}` });
    kill.addEventListener("click", () => killConnection(c.id));
    const add = el("button", "toxic", { class: "add-toxic", "data-focus": `add-toxic\n${c.id}`,
                                        "aria-label": `add a toxic to connection ${c.id}` });
    add.addEventListener("click", () => toxicForConnection(c));
    const cell = el("td", null, { class: "actions" });
    cell.append(kill, " ", add);
    row.append(cell);
    return row;
  }));
}

// A connection's toxics (GET /connections lists their names, its proxy's
// first): those of its own (POSTed to /connections/ID/toxics) with a remove
// button; its proxy's are removed in the proxy's section.
function connectionToxics(c) {
  const cell = el("td", null, { class: "conn-toxics" });
  const proxy = state.proxies[c.proxy];
  const shared = new Set(proxy ? proxy.toxics.map((t) => t.name) : []);
  for (const name of c.toxics || []) {
    if (shared.has(name)) {
      cell.append(el("span", name, { class: "shared", title: `a toxic of proxy ${c.proxy}` }), " ");
      continue;
    }
    const remove = el("button", `${name} ×`, {
      class: "remove-conn-toxic", "data-toxic": name, "data-focus": `conn-toxic\n${c.id}\n${name}`,
      "aria-label": `remove toxic ${name} from connection ${c.id}`,
    });
    remove.addEventListener("click", () => removeConnectionToxic(c.id, name));
    cell.append(remove, " ");
  }
  return cell;
}

// "toxic" in a connection's row: the proxy's toxic form, aimed at that connection.
function toxicForConnection(c) {
  const section = document.querySelector(`section.proxy[data-proxy="${CSS.escape(c.proxy)}"]`);
  if (!section) return;
  if (state.editing[c.proxy]) stopEditing(section);
  const form = section.querySelector(".toxic-form");
  form.elements.connection.value = c.id;
  form.scrollIntoView({ block: "nearest" });
  form.elements.type.focus();
}

async function removeConnectionToxic(id, name) {
  try {
    await api("DELETE", `/connections/${encodeURIComponent(id)}/toxics/${encodeURIComponent(name)}`);
    const c = (state.connections || []).find((x) => x.id === id);
    if (c) c.toxics = c.toxics.filter((t) => t !== name);
    render();
  } catch (e) {
    notice(`connection ${id}, toxic ${name}: ${e.message}`);
  }
}

// A failed action's message, kept next to the count for a while (the
// table's status line is rewritten at every poll).
const NOTICE_MS = 10000;
function notice(text) {
  state.notice = { text, until: Date.now() + NOTICE_MS };
  render();
}

async function killConnection(id) {
  try {
    await api("DELETE", `/connections/${encodeURIComponent(id)}`);
    state.connections = state.connections.filter((c) => c.id !== id);
    render();
  } catch (e) {
    notice(`kill ${id}: ${e.message}`);
  }
}

// Each sortable header holds a button (Tab reaches it, Enter or Space sorts);
// aria-sort says the order to a screen reader.
for (const th of document.querySelectorAll("#connections th[data-key]")) {
  const button = el("button", th.textContent, { type: "button", class: "sort" });
  th.replaceChildren(button);
  button.addEventListener("click", () => {
    const key = th.dataset.key;
    state.sort = { key, asc: state.sort.key === key ? !state.sort.asc : true };
    for (const other of document.querySelectorAll("#connections th")) {
      other.classList.remove("sorted", "asc");
      other.removeAttribute("aria-sort");
    }
    th.classList.add("sorted");
    th.classList.toggle("asc", state.sort.asc);
    th.setAttribute("aria-sort", state.sort.asc ? "ascending" : "descending");
    render();
  });
}
for (const id of ["conn-proxy", "conn-filter"]) {
  document.getElementById(id).addEventListener("input", () => render());
}

loadToxicTypes();
poll();
