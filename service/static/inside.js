// "Inside": what the network holds while it reads a text (POST /v1/inspect), in the dialog of
// templates/inside.html. The text coloured by one cell, blue below zero to red above (Karpathy,
// Johnson and Fei-Fei's picture); the cells the server ranks as following a feature of the text; a
// heatmap of a whole layer (characters across, cells down); hover or arrow keys show one character's
// gates and what the model expected next.
// Values come as float16 and are decoded here; one layer is asked for at a time, in as many requests
// as the server's bound on values per request needs.

import { ApiError, describe, inspect } from "./api.js";
import { percent, placeTip, visible } from "./answer.js";

const $ = (id) => document.getElementById(id);
const RANKED = 3; // cells ranked per feature
const CHAR_WIDTH = 8; // CSS pixels per character in the heatmap
const MAP_HEIGHT = 320; // CSS pixels the heatmap's cells aim to fill (a row is 1 to 6 pixels high)
const GATES = { // as /v1/inspect names them
  lstm: ["input", "forget", "output", "candidate"],
  gru: ["update", "reset", "candidate"],
  rnn: ["preactivation"],
};
const SIGMOID = new Set(["input", "forget", "output", "update", "reset"]); // 0..1; the others read as -1..1
const NAMES = { hidden: "hidden state", cell: "cell state" };

// What the view calls a quantity: the sigmoid ones are gates; the candidate and the RNN's preactivation are not.
function nameOf(n) {
  return NAMES[n] ?? (SIGMOID.has(n) ? `${n} gate` : n);
}

const ui = {
  dialog: $("inside"), close: $("inside-close"), form: $("inside-form"), text: $("inside-text"), run: $("inside-run"),
  model: $("inside-model"), error: $("inside-error"), status: $("inside-status"), view: $("inside-view"),
  layer: $("inside-layer"), cell: $("inside-cell"), cellHelp: $("inside-cell-help"), colour: $("inside-colour"),
  ranking: $("inside-ranking"), picked: $("inside-picked"), chars: $("inside-chars"),
  legendLow: $("inside-legend-low"), legendHigh: $("inside-legend-high"),
  mapQuantity: $("inside-map-quantity"), mapLow: $("inside-map-low"), mapHigh: $("inside-map-high"),
  mapChars: $("inside-map-chars"), heat: $("inside-map-heat"), mark: $("inside-map-mark"),
  saturationPart: $("inside-saturation-part"), saturation: $("inside-saturation"), saturationKind: $("inside-saturation-kind"),
  tip: $("inside-tip"), note: $("inside-note"),
};

// What the last answer said about the text, and the arrays read so far: values.get(layer).get(name),
// name being "hidden", "cell" or a gate's, each {T, H, data: Float32Array(T * H)}.
let seen = null; // {model, cellType, units, numLayers, chars, next, ranking, saturation}
let values = new Map();
let pick = { layer: 1, cell: 0, quantity: "hidden" };
let current = null; // the character whose tip is shown
let reading = null; // AbortController of the requests that read a new text
let loading = null; // {layer, controller, done} of another layer being read
let shown = null; // the pick the view shows
let summary = ""; // what the status line says once a text is read
let most = null; // the most arrays one request may ask for this text (null: not yet refused)
let limit = null; // the longest text /v1/inspect reads (/info's limits.max_inspect_chars; null: not known yet)

// ---------------------------------------------------------------- values

function half(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

// One array of the answer, as {T, H, data}: "float16" ({shape, data: base64}) or "list" ([[...H] x T]).
function decode(value) {
  if (Array.isArray(value)) {
    const T = value.length;
    const H = T ? value[0].length : 0;
    const data = new Float32Array(T * H);
    value.forEach((row, t) => data.set(row, t * H));
    return { T, H, data };
  }
  const [T, H] = value.shape;
  const bytes = Uint8Array.from(atob(value.data), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const data = new Float32Array(T * H);
  for (let i = 0; i < data.length; i++) data[i] = half(view.getUint16(2 * i, true));
  return { T, H, data };
}

// Each array on one scale, -1..1: gates (0..1) are stretched, the unbounded ones squashed as the
// network itself squashes them (tanh of the cell state, of the RNN's pre-activation).
function scaled(name, v) {
  if (SIGMOID.has(name)) return 2 * v - 1;
  if (name === "cell" || name === "preactivation") return Math.tanh(v);
  return v;
}

function range(name) {
  if (SIGMOID.has(name)) return ["0 (shut)", "1 (open)"];
  if (name === "cell") return ["tanh(c) −1", "+1"];
  if (name === "preactivation") return ["tanh −1", "+1"];
  return ["−1", "+1"];
}

function quantities(cellType) {
  return [...(cellType === "lstm" ? ["hidden", "cell"] : ["hidden"]), ...GATES[cellType]];
}

function request(names, layer, extra = {}) {
  const body = { text: ui.text.dataset.sent, layers: [layer], encoding: "float16", ...extra };
  const gates = names.filter((n) => n !== "hidden" && n !== "cell");
  body.quantities = names.filter((n) => n === "hidden" || n === "cell");
  if (gates.length) {
    body.quantities.push("gates");
    body.gates = gates;
  }
  if (ui.dialog.dataset.model) body.model = ui.dialog.dataset.model;
  return body;
}

// Into `store`: the arrays of the text they were asked for, even if another text is read meanwhile.
function keep(answer, names, store) {
  for (const entry of answer.layers) {
    const layer = store.get(entry.layer) ?? new Map();
    store.set(entry.layer, layer);
    for (const name of names) {
      const value = name === "hidden" || name === "cell" ? entry[name] : entry.gates?.[name];
      if (value) layer.set(name, decode(value));
    }
  }
}

function apiKey() {
  return $("api-key")?.value.trim() || undefined;
}

// Asks for `names` of one layer, in pieces of at most `most` arrays: a piece over the server's bound
// (422 too_large) halves `most`, which then holds for the rest of this text.
async function fetchArrays(names, layer, signal, store) {
  let i = 0;
  while (i < names.length) {
    const part = names.slice(i, i + (most ?? names.length));
    try {
      keep(await inspect(request(part, layer), { signal, apiKey: apiKey() }), part, store);
      i += part.length;
    } catch (e) {
      if (!(e instanceof ApiError && e.code === "too_large" && part.length > 1)) throw e;
      most = Math.ceil(part.length / 2);
    }
  }
}

async function ensureLayer(layer, signal) {
  const store = values;
  const missing = quantities(seen.cellType).filter((n) => !store.get(layer)?.has(n));
  if (missing.length) await fetchArrays(missing, layer, signal, store);
}

// ---------------------------------------------------------------- reading a text

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

// A text longer than the server reads is refused here, with the limit.
function tooLong(text) {
  const length = Array.from(text).length; // counted as the server counts: by code point
  if (!limit || length <= limit) return false;
  ui.status.textContent = "";
  ui.view.hidden = true;
  hideTip();
  showError(`This text has ${length.toLocaleString("en")} characters; Inside reads at most ${
    limit.toLocaleString("en")}. Shorten it, then look again.`);
  ui.text.setAttribute("aria-invalid", "true");
  return true;
}

async function read() {
  reading?.abort();
  loading?.controller.abort();
  if (tooLong(ui.text.value)) return;
  const controller = new AbortController();
  reading = controller;
  const signal = controller.signal;
  ui.text.dataset.sent = ui.text.value; // what the later requests (another layer) read too
  ui.text.removeAttribute("aria-invalid");
  ui.error.hidden = true;
  ui.view.hidden = true;
  hideTip();
  seen = null;
  values = new Map();
  most = null;
  summary = "";
  ui.status.textContent = "Reading the text…";
  ui.run.disabled = true;
  try {
    // first the ranking over every layer (with layer 1's hidden state), then the picked cell's layer
    const answer = await inspect(request(["hidden"], 1, { cells: RANKED }), { signal, apiKey: apiKey() });
    seen = {
      model: answer.model, cellType: answer.cell_type, units: answer.units, numLayers: answer.num_layers,
      chars: answer.chars, next: answer.next, ranking: answer.ranking ?? [], saturation: answer.saturation ?? [],
    };
    keep(answer, ["hidden"], values);
    if (seen.chars.length === 0) {
      ui.status.textContent = "";
      showError("No character of this text is in the model's vocabulary: there is nothing for it to read.");
      ui.text.setAttribute("aria-invalid", "true");
      return;
    }
    const best = bestRanked(seen.ranking);
    pick = best ?? { layer: seen.numLayers, cell: 0, quantity: "hidden" };
    setUpControls();
    await ensureLayer(pick.layer, signal);
    if (signal.aborted) return;
    ui.view.hidden = false;
    render();
    const dropped = answer.dropped?.length ?? 0;
    summary = `${seen.chars.length.toLocaleString("en")} characters read by ${seen.model} (${
      seen.cellType.toUpperCase()} ${seen.numLayers}×${seen.units}).${
      dropped ? ` ${dropped} not in its vocabulary ${dropped > 1 ? "were" : "was"} left out.` : ""}`;
    ui.status.textContent = summary;
  } catch (e) {
    if (e.name === "AbortError") return;
    ui.status.textContent = "";
    showError(describe(e));
    if (e instanceof ApiError && e.param === "text") ui.text.setAttribute("aria-invalid", "true");
  } finally {
    if (reading === controller) {
      reading = null;
      ui.run.disabled = false;
    }
  }
}

function bestRanked(ranking) {
  let best = null;
  for (const feature of ranking) {
    for (const c of feature.cells) {
      if (!best || Math.abs(c.r) > Math.abs(best.r)) best = { ...c, quantity: c.quantity ?? "hidden" };
    }
  }
  return best && { layer: best.layer, cell: best.cell, quantity: best.quantity };
}

// ---------------------------------------------------------------- the controls

function option(value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  return o;
}

function setUpControls() {
  ui.model.textContent = `${seen.model} · ${seen.cellType.toUpperCase()} ${seen.numLayers}×${seen.units}`;
  ui.layer.replaceChildren(...Array.from({ length: seen.numLayers }, (_, i) => option(i + 1, `${i + 1}`)));
  ui.cell.max = String(seen.units - 1);
  ui.cellHelp.textContent = `0 to ${seen.units - 1}`;
  const names = quantities(seen.cellType);
  ui.colour.replaceChildren(...names.filter((n) => NAMES[n]).map((n) => option(n, NAMES[n])));
  ui.mapQuantity.replaceChildren(...names.map((n) => option(n, nameOf(n))));
  ui.mapQuantity.value = names.find((n) => SIGMOID.has(n)) ?? names[names.length - 1];
  renderChars();
  renderRanking();
  renderSaturation();
}

// Picks a cell (or layer, or what colours the text), reading its layer first where need be; if that
// fails, the view stays on the cell it shows.
async function choose(next) {
  const wanted = { ...pick, ...next };
  pick = wanted;
  try {
    if (quantities(seen.cellType).some((n) => !values.get(wanted.layer)?.has(n))) {
      // another pick of the same layer waits for the same requests; one of another layer replaces them
      if (loading?.layer !== wanted.layer) {
        loading?.controller.abort();
        const controller = new AbortController();
        loading = { layer: wanted.layer, controller, done: ensureLayer(wanted.layer, controller.signal) };
      }
      const mine = loading;
      ui.status.textContent = `Reading layer ${wanted.layer}…`;
      try {
        await mine.done;
      } finally {
        if (loading === mine) loading = null;
      }
    }
    ui.error.hidden = true;
  } catch (e) {
    if (e.name === "AbortError") return;
    showError(describe(e));
    if (pick === wanted) pick = shown;
  }
  ui.status.textContent = summary;
  if (pick === wanted || pick === shown) render();
}

ui.layer.addEventListener("change", () => choose({ layer: Number(ui.layer.value) }));
ui.colour.addEventListener("change", () => choose({ quantity: ui.colour.value }));
ui.cell.addEventListener("change", () => {
  const cell = Number(ui.cell.value);
  if (ui.cell.value.trim() === "" || !Number.isInteger(cell) || cell < 0 || cell >= seen.units) {
    ui.cell.setAttribute("aria-invalid", "true");
    showError(`Cell is a whole number from 0 to ${seen.units - 1}.`);
    return;
  }
  ui.cell.removeAttribute("aria-invalid");
  choose({ cell });
});
ui.mapQuantity.addEventListener("change", () => drawMap());

// ---------------------------------------------------------------- drawing

function render() {
  shown = pick;
  ui.layer.value = String(pick.layer);
  if (document.activeElement !== ui.cell) { // not under the fingers of someone typing a number
    ui.cell.value = String(pick.cell);
    ui.cell.removeAttribute("aria-invalid");
  }
  ui.colour.value = pick.quantity;
  ui.picked.textContent = `layer ${pick.layer}, cell ${pick.cell} (${NAMES[pick.quantity]})`;
  [ui.legendLow.textContent, ui.legendHigh.textContent] = range(pick.quantity);
  for (const button of ui.ranking.querySelectorAll("button")) {
    const c = button.cell;
    button.setAttribute("aria-pressed", String(c.layer === pick.layer && c.cell === pick.cell && c.quantity === pick.quantity));
  }
  colourChars();
  drawMap();
  if (current !== null) showTip(current);
}

function renderChars() {
  const fragment = document.createDocumentFragment();
  seen.chars.forEach((char, t) => {
    const span = document.createElement("span");
    span.className = "ch";
    span.textContent = char;
    span.t = t;
    fragment.append(span);
  });
  ui.chars.replaceChildren(fragment);
}

// Background of each character: red for the cell above zero, blue below, as strong as |value|.
function colourChars() {
  const array = values.get(pick.layer)?.get(pick.quantity);
  if (!array) return;
  ui.chars.querySelectorAll(".ch").forEach((span, t) => {
    const v = scaled(pick.quantity, array.data[t * array.H + pick.cell]);
    // CSSOM, not a style attribute: allowed by the page's CSP
    span.style.setProperty("background-color", `rgb(var(${v >= 0 ? "--inside-high" : "--inside-low"}) / ${(0.8 * Math.min(1, Math.abs(v))).toFixed(3)})`);
    span.dataset.v = v.toFixed(4);
  });
}

function renderRanking() {
  const items = [];
  for (const feature of seen.ranking) {
    for (const c of feature.cells) {
      const cell = { layer: c.layer, cell: c.cell, quantity: c.quantity ?? "hidden" };
      const button = document.createElement("button");
      button.type = "button";
      button.cell = cell;
      const r = c.r.toFixed(2).replace("-", "−");
      button.textContent = `layer ${c.layer}, cell ${c.cell}${cell.quantity === "cell" ? " (cell state)" : ""}: ${feature.label}, r = ${r}`;
      button.addEventListener("click", () => choose(cell));
      const li = document.createElement("li");
      li.append(button);
      items.push(li);
    }
  }
  if (!items.length) {
    const li = document.createElement("li");
    li.className = "help";
    li.textContent = "No cell follows a feature of this text (a longer text, with lines and quotes, gives the ranking more to go on).";
    items.push(li);
  }
  ui.ranking.replaceChildren(...items);
}

// The server counts a gate (0..1) below 0.1 and above 0.9, a tanh value (-1..1: the candidate, the
// RNN's tanh(preactivation), which is its hidden state) below -0.9 and above 0.9; each row says which.
function renderSaturation() {
  ui.saturationKind.textContent = seen.cellType === "rnn" ? "Value" : "Gate";
  const rows = seen.saturation.map((s) => {
    const tr = document.createElement("tr");
    const gate = SIGMOID.has(s.gate);
    const name = gate ? s.gate : s.gate === "preactivation" ? "tanh(preactivation)" : `${s.gate} (tanh)`;
    for (const text of [s.layer, name, `${percent(s.low)} near ${gate ? "0" : "−1"}`, `${percent(s.high)} near 1`]) {
      const td = document.createElement("td");
      td.textContent = String(text);
      tr.append(td);
    }
    return tr;
  });
  ui.saturation.replaceChildren(...rows);
  ui.saturationPart.hidden = rows.length === 0;
}

// "#rrggbb" or "r g b" (a custom property of style.css) as [r, g, b].
function rgb(value) {
  value = value.trim();
  if (value.startsWith("#")) return [1, 3, 5].map((i) => parseInt(value.slice(i, i + 2), 16));
  return value.split(/[\s,]+/).map(Number);
}

function drawMap() {
  const name = ui.mapQuantity.value;
  const array = values.get(pick.layer)?.get(name);
  if (!array) return;
  if (ui.heat.drawn !== array) paintMap(name, array);
  // the picked cell's row
  const rowHeight = ui.heat.rowHeight;
  ui.mark.style.setProperty("top", `${pick.cell * rowHeight}px`);
  ui.mark.style.setProperty("height", `${Math.max(2, rowHeight)}px`);
  ui.mark.style.setProperty("width", `${array.T * CHAR_WIDTH}px`);
}

function paintMap(name, array) {
  const { T, H, data } = array;
  const style = getComputedStyle(ui.dialog);
  const [base, low, high] = ["--surface", "--inside-low", "--inside-high"].map((p) => rgb(style.getPropertyValue(p)));
  const rowHeight = Math.max(1, Math.min(6, Math.floor(MAP_HEIGHT / H)));

  // one pixel per value, stretched by CSS (image-rendering: pixelated)
  ui.heat.width = T;
  ui.heat.height = H;
  const context = ui.heat.getContext("2d");
  const image = context.createImageData(T, H);
  for (let u = 0; u < H; u++) {
    for (let t = 0; t < T; t++) {
      const v = scaled(name, data[t * H + u]);
      const a = 0.9 * Math.min(1, Math.abs(v));
      const tone = v >= 0 ? high : low;
      const i = 4 * (u * T + t);
      for (let k = 0; k < 3; k++) image.data[i + k] = Math.round(base[k] * (1 - a) + tone[k] * a);
      image.data[i + 3] = 255;
    }
  }
  context.putImageData(image, 0, 0);
  ui.heat.style.setProperty("width", `${T * CHAR_WIDTH}px`);
  ui.heat.style.setProperty("height", `${H * rowHeight}px`);
  ui.heat.rowHeight = rowHeight;
  ui.heat.setAttribute("aria-label", `Heatmap of layer ${pick.layer}'s ${nameOf(name)}: ${H} cells over ${T} characters.`);
  ui.heat.drawn = array;
  [ui.mapLow.textContent, ui.mapHigh.textContent] = range(name);

  // the characters above their columns, at the screen's resolution (within a canvas's widest)
  const scale = Math.max(1, Math.min(window.devicePixelRatio || 1, Math.floor(32_000 / (T * CHAR_WIDTH))));
  ui.mapChars.width = T * CHAR_WIDTH * scale;
  ui.mapChars.height = 16 * scale;
  ui.mapChars.style.setProperty("width", `${T * CHAR_WIDTH}px`);
  ui.mapChars.style.setProperty("height", "16px");
  const label = ui.mapChars.getContext("2d");
  label.scale(scale, scale);
  label.fillStyle = style.getPropertyValue("--muted").trim() || "gray";
  label.font = `11px ${style.getPropertyValue("--mono")}`;
  label.textAlign = "center";
  label.textBaseline = "middle";
  seen.chars.forEach((char, t) => {
    label.fillText(char === "\n" ? "↵" : char === " " ? "·" : char, t * CHAR_WIDTH + CHAR_WIDTH / 2, 8);
  });
}

ui.heat.addEventListener("click", (e) => {
  const u = Math.floor(e.offsetY / ui.heat.rowHeight);
  if (seen && u >= 0 && u < seen.units) choose({ cell: u });
});
ui.heat.addEventListener("mousemove", (e) => {
  const t = Math.floor(e.offsetX / CHAR_WIDTH);
  const u = Math.floor(e.offsetY / ui.heat.rowHeight);
  if (seen && t >= 0 && t < seen.chars.length && u >= 0 && u < seen.units) {
    showTip(t, u, { left: e.clientX, right: e.clientX, top: e.clientY, bottom: e.clientY + 12 });
  }
});
ui.heat.addEventListener("mouseleave", () => hideTip());

// ---------------------------------------------------------------- the tip: one character

function row(name, value, fraction, picked = false) {
  const li = document.createElement("li");
  if (picked) li.className = "picked";
  const label = document.createElement("span");
  label.className = "alt-char";
  label.textContent = name;
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.setProperty("width", `${Math.max(1, Math.min(1, fraction) * 100).toFixed(1)}%`);
  bar.append(fill);
  const shown = document.createElement("span");
  shown.className = "alt-p";
  shown.textContent = value;
  li.append(label, bar, shown);
  return li;
}

function paragraph(className, ...parts) {
  const p = document.createElement("p");
  p.className = className;
  p.append(...parts);
  return p;
}

// The values of cell `u` (the picked one unless the heatmap says otherwise) after character t, and the
// model's guesses for the character after it.
function showTip(t, u = pick.cell, at = null) {
  const layer = values.get(pick.layer);
  if (!seen || !layer) return;
  const span = ui.chars.children[t];
  ui.chars.querySelector(".ch.current")?.classList.remove("current");
  if (!at) span?.classList.add("current");
  current = at ? current : t;
  const char = document.createElement("strong");
  char.textContent = visible(seen.chars[t]);
  const head = paragraph("tip-head", char, ` (character ${t + 1}): layer ${pick.layer}, cell ${u}`);
  const list = document.createElement("ol");
  list.className = "tip-list";
  for (const name of quantities(seen.cellType)) {
    const array = layer.get(name);
    if (!array) continue;
    const v = array.data[t * array.H + u];
    const fraction = SIGMOID.has(name) ? v : Math.abs(scaled(name, v));
    list.append(row(NAMES[name] ?? name, v.toFixed(2).replace("-", "−"), fraction));
  }
  const next = seen.next[t];
  const guesses = document.createElement("ol");
  guesses.className = "tip-list";
  for (const [alt, p] of next?.top ?? []) guesses.append(row(visible(alt), percent(p), p, alt === next.char));
  const caption = paragraph("tip-caption", next?.char === null || next?.char === undefined
    ? "The text ends here; the model expected:" : `Next comes ${visible(next.char)} (${percent(next.p)}); the model expected:`);
  ui.tip.replaceChildren(head, list, caption, guesses);
  ui.tip.hidden = false;
  placeTip(ui.tip, at ?? span.getBoundingClientRect());
}

function hideTip() {
  ui.chars.querySelector(".ch.current")?.classList.remove("current");
  current = null;
  ui.tip.hidden = true;
}

ui.chars.addEventListener("mouseover", (e) => {
  const span = e.target.closest?.(".ch");
  if (span) showTip(span.t);
});
ui.chars.addEventListener("click", (e) => {
  const span = e.target.closest?.(".ch");
  if (span) showTip(span.t);
});
ui.chars.addEventListener("mouseleave", () => {
  if (document.activeElement !== ui.chars) hideTip();
});
ui.chars.addEventListener("focus", () => {
  if (seen?.chars.length) showTip(current ?? 0);
});
ui.chars.addEventListener("blur", () => hideTip());
ui.chars.addEventListener("keydown", (e) => {
  if (!seen) return;
  const last = seen.chars.length - 1;
  let t = current ?? 0;
  if (e.key === "ArrowRight") t += 1;
  else if (e.key === "ArrowLeft") t -= 1;
  else if (e.key === "Home") t = 0;
  else if (e.key === "End") t = last;
  else if (e.key === "ArrowUp" || e.key === "ArrowDown") {
    e.preventDefault();
    const cell = pick.cell + (e.key === "ArrowUp" ? -1 : 1);
    if (cell >= 0 && cell < seen.units) {
      current = current ?? 0;
      choose({ cell });
    }
    return;
  } else if (e.key === "Escape" && !ui.tip.hidden) {
    e.preventDefault(); // closes the tip, not the dialog
    hideTip();
    return;
  } else return;
  e.preventDefault();
  t = Math.max(0, Math.min(last, t));
  ui.chars.children[t]?.scrollIntoView({ block: "nearest" });
  showTip(t);
});
// a scroll moves the characters from under the tip; the tip of one walked to from the keyboard follows it
ui.dialog.addEventListener("scroll", () => {
  if (document.activeElement === ui.chars && current !== null) placeTip(ui.tip, ui.chars.children[current].getBoundingClientRect());
  else hideTip();
}, { passive: true, capture: true });

// ---------------------------------------------------------------- opening

ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  read();
});
ui.text.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    read();
  }
});
ui.text.addEventListener("input", () => { ui.note.hidden = true; });
ui.close.addEventListener("click", () => ui.dialog.close());
ui.dialog.addEventListener("close", () => {
  reading?.abort();
  loading?.controller.abort();
  hideTip();
});

// The longest text the server's /v1/inspect reads (chat.js, from /info).
export function setInspectLimit(chars) {
  limit = chars ?? null;
}

// Opens the dialog on `text` (a reply with its prompt, from chat.js) and reads it at once, its last
// `limit` characters if it is longer, as Continue does (the state after them mostly depends on the
// recent text anyway); without text it opens on the text box, to paste one.
export function openInside({ text = "", model } = {}) {
  if (model) ui.dialog.dataset.model = model;
  else delete ui.dialog.dataset.model;
  if (!ui.dialog.open) ui.dialog.showModal();
  const chars = Array.from(text);
  const cut = limit && chars.length > limit;
  ui.note.textContent = cut ? `This reply and its prompt have ${chars.length.toLocaleString("en")} characters; Inside reads at most ${
    limit.toLocaleString("en")} at once, so it shows the last ${limit.toLocaleString("en")} characters.` : "";
  ui.note.hidden = !cut;
  if (text) {
    ui.text.value = cut ? chars.slice(-limit).join("") : text;
    read();
  } else {
    ui.text.focus();
  }
}

// The page's own "Look inside" (its header): the model picked on the page, a pasted text.
$("inside-open")?.addEventListener("click", () => openInside({ model: $("model-picker")?.value || undefined }));
