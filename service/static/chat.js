// The page at / (a transcript of turns) and its compact variant at /embed (one answer at a time,
// body.embed). One generation runs at a time; Stop aborts its fetch, which closes the connection
// and frees the server's slot.

import { ApiError, describe, generate, getInfo, score } from "./api.js";
import { Answer, ProbabilityTips } from "./answer.js";
import { clearFormatError, formatControls, formatSettings, offerExamples, showFormatError } from "./format.js";
import { openInside, setInspectLimit } from "./inside.js";

const $ = (id) => document.getElementById(id);
const compact = document.body.classList.contains("embed");
const LOGPROBS = 5; // alternatives asked for per character when probabilities are shown
const FINISH = { length: "reached max characters", stop: "hit a stop sequence" };

const ui = {
  transcript: $("transcript"), intro: $("intro"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
  maxChars: $("max-chars"), probabilities: $("probabilities"), topK: $("top-k"), topP: $("top-p"),
  seed: $("seed"), stopSequences: $("stop-sequences"), apiKey: $("api-key"), apiKeyField: $("api-key-field"),
  model: $("model"), modelDetails: $("model-details"), announce: $("announce"), tip: $("tip"),
  modelField: $("model-field"), modelPicker: $("model-picker"), modelNote: $("model-note"),
  minP: $("min-p"), repetitionPenalty: $("repetition-penalty"), repetitionWindow: $("repetition-window"),
  presencePenalty: $("presence-penalty"), frequencyPenalty: $("frequency-penalty"), logitBias: $("logit-bias"),
  template: $("turn-template"), promptError: $("prompt-error"),
};

// The sampling settings, by request field, and their controls (the embed has only the temperature's).
// Each starts at the server's default (/info) unless the query string presets it.
const SETTINGS = {
  temperature: ui.temperature, max_chars: ui.maxChars, top_k: ui.topK, top_p: ui.topP, min_p: ui.minP,
  repetition_penalty: ui.repetitionPenalty, repetition_window: ui.repetitionWindow,
  presence_penalty: ui.presencePenalty, frequency_penalty: ui.frequencyPenalty,
};
// The request field each control sets: a 422 naming the field marks the control.
const FIELDS = { ...SETTINGS, seed: ui.seed, stop: ui.stopSequences, logit_bias: ui.logitBias, prompt: ui.prompt, ...formatControls() };

let info = null; // GET /info, once it has answered
let running = null; // {controller, turn} of the generation in progress
let turns = []; // the Turns on screen, oldest first

// ---------------------------------------------------------------- settings

class SettingsError extends Error {
  constructor(control, message) {
    super(message);
    this.control = control;
  }
}

function labelOf(control) {
  return control.labels?.[0]?.textContent.trim() || control.id;
}

// A number field: empty means "the server's default"; text that is not a number is caught here
// (the browser hands it over as ""), anything numeric goes to the server, which judges the range.
function number(control) {
  if (!control) return undefined;
  if (control.validity.badInput) throw new SettingsError(control, `${labelOf(control)} is not a number.`);
  const value = control.value.trim();
  if (value === "") return undefined;
  if (!Number.isFinite(Number(value))) throw new SettingsError(control, `${labelOf(control)} is too large.`);
  return Number(value);
}

// "\n" in a stop sequence means a line break (a textarea line cannot hold one); "\\" a backslash.
function unescape(line) {
  return line.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
}

function requestSettings() {
  const body = { ...uncontrolled };
  // the slider always holds some value: it is sent once it shows a chosen one (else the server's default applies)
  if (ui.temperature.dataset.chosen) body.temperature = Number(ui.temperature.value);
  for (const [name, control] of Object.entries(SETTINGS)) {
    if (control === ui.temperature) continue;
    const value = number(control);
    if (value !== undefined) body[name] = value;
  }
  if (ui.seed && ui.seed.value.trim() !== "") {
    if (ui.seed.validity.badInput) throw new SettingsError(ui.seed, "Seed is not a number.");
    const seed = ui.seed.value.trim();
    if (!Number.isFinite(Number(seed))) throw new SettingsError(ui.seed, "Seed is not a number.");
    // digits go to the server as written (a JS number would round seeds above 2^53)
    body.seed = /^\d+$/.test(seed) ? seed : String(Number(seed));
  }
  if (ui.stopSequences) {
    const stops = ui.stopSequences.value.split("\n").filter((line) => line !== "").map(unescape);
    if (stops.length) body.stop = stops;
  }
  const biases = logitBias();
  if (biases) body.logit_bias = biases;
  if (ui.probabilities?.checked) body.logprobs = LOGPROBS;
  if (ui.modelPicker.value) body.model = ui.modelPicker.value;
  return { ...body, ...formatSettings() };
}

// "CHARACTER=BIAS" per line ("\n" for a line break, as in stop sequences): the request's logit_bias.
function logitBias() {
  if (!ui.logitBias) return undefined;
  const biases = {};
  for (const line of ui.logitBias.value.split("\n")) {
    if (line.trim() === "") continue;
    const at = line.lastIndexOf("=");
    const key = unescape(line.slice(0, at));
    const bias = Number(line.slice(at + 1).trim());
    if (at < 1 || line.slice(at + 1).trim() === "" || !Number.isFinite(bias)) {
      throw new SettingsError(ui.logitBias, `“${line}” is not character=bias (a number from −100 to 100).`);
    }
    biases[key] = bias;
  }
  return Object.keys(biases).length ? biases : undefined;
}

function markInvalid(control) {
  if (!control) return;
  control.setAttribute("aria-invalid", "true");
  const details = control.closest("details");
  if (details) details.open = true;
}

document.addEventListener("input", (e) => e.target.removeAttribute?.("aria-invalid"));

function showTemperature() {
  const t = Number(ui.temperature.value);
  if (!ui.temperature.dataset.chosen) ui.temperatureValue.value = "default";
  else ui.temperatureValue.value = t === 0 ? "0 (greedy)" : t.toFixed(2);
}

// Query-string presets (?prompt=…&temperature=…&max_chars=…&top_k=…&top_p=…&model=…), so a site embedding
// the page can start it with its own example. Values only ever fill form fields, or, for a setting this
// page has no control for, go into the request as numbers. The numeric ones wait for /info: one the server
// would refuse (not a number in decimal notation, not a whole number where the server takes one, or out of
// the server's bounds) is dropped, and the server's default applies.
const presets = new URLSearchParams(location.search);
const uncontrolled = {};
// A number as a number field takes it (HTML's floating-point number): Number() would also read 0x10, 0b1, Infinity.
const DECIMAL = /^-?(\d+(\.\d+)?|\.\d+)([eE][+-]?\d+)?$/;

// What the server takes for each setting (service/schemas.py), with the bounds /info states: `above` is an
// open lower end, `whole` an integer; a bound /info leaves out is left to the server.
function ranges({ bounds = {}, limits = {} }) {
  const penalty = bounds.max_penalty ?? Infinity;
  return {
    temperature: { min: 0, max: bounds.max_temperature },
    max_chars: { min: 1, max: limits.max_chars, whole: true },
    top_k: { min: 0, max: bounds.max_top_k, whole: true },
    top_p: { above: 0, max: 1 },
    min_p: { min: 0, max: 1 },
    repetition_penalty: { above: 0, max: bounds.max_repetition_penalty },
    repetition_window: { min: 0, max: bounds.max_repetition_window, whole: true },
    presence_penalty: { min: -penalty, max: penalty },
    frequency_penalty: { min: -penalty, max: penalty },
  };
}

function presetNumber(name, { min = -Infinity, above = -Infinity, max = Infinity, whole = false }) {
  const value = presets.get(name)?.trim() ?? "";
  const n = DECIMAL.test(value) ? Number(value) : NaN;
  const kept = Number.isFinite(n) && (!whole || Number.isInteger(n)) && n >= min && n > above && n <= max;
  return kept ? n : undefined;
}

function setSetting(name, value) {
  const control = SETTINGS[name];
  if (control === ui.temperature) {
    const t = Number(value);
    if (t > Number(control.max)) control.max = String(t); // a default (or preset) above the slider's range widens it
    control.value = String(t);
    if (Number(control.value) !== t) control.step = "any"; // and one between its steps (0.33) is kept as it is
    control.value = String(t);
    control.dataset.chosen = "true";
    showTemperature();
  } else {
    control.value = String(value);
  }
}

// Once /info has answered: each setting's preset if the server takes it, else the server's default, into
// the controls that no person has set yet; the presets of settings without a control into the request.
function applyDefaults(data) {
  const range = ranges(data);
  for (const [name, control] of Object.entries(SETTINGS)) {
    const preset = presets.has(name) ? presetNumber(name, range[name]) : undefined;
    if (!control) {
      if (preset !== undefined) uncontrolled[name] = preset;
      continue;
    }
    const value = preset ?? data.defaults?.[name];
    const untouched = control === ui.temperature ? !control.dataset.chosen : control.value === "";
    if (untouched && value !== undefined) setSetting(name, value);
  }
}

// ---------------------------------------------------------------- the models, from /info

const compactNumber = new Intl.NumberFormat("en", { notation: "compact" });

// One model of /info's `models` (the shape of its `model`).
function describeModel(m) {
  const parts = [m.name, `${String(m.cell).toUpperCase()} ${m.layers}×${m.units}`];
  if (m.parameters) parts.push(`${compactNumber.format(m.parameters)} parameters`);
  ui.model.textContent = parts.join(" · ");
  if (ui.modelDetails) {
    const corpus = m.corpus?.name ? `It learned from ${m.corpus.name}` : "";
    const chars = m.corpus?.chars ? ` (${new Intl.NumberFormat("en").format(m.corpus.chars)} characters)` : "";
    const bits = m.validation?.bits_per_char ? `; on text it never saw, it needs ${
      Number(m.validation.bits_per_char).toFixed(2)} bits per character` : "";
    ui.modelDetails.textContent = corpus ? `${corpus}${chars}${bits}.` : "";
  }
  ui.model.title = `Vocabulary of ${m.vocab_size} characters`;
  offerExamples(m.name, m.vocab_size);
}

// A picker entry: what the model learned from, its size and how well it predicts unseen text.
function modelLabel(m) {
  const parts = [m.name];
  if (m.corpus?.name) parts.push(m.corpus.name);
  if (m.parameters) parts.push(`${compactNumber.format(m.parameters)} parameters`);
  if (m.validation?.bits_per_char) parts.push(`${Number(m.validation.bits_per_char).toFixed(2)} bits/char`);
  return parts.join(" · ");
}

function selectedModel() {
  return info?.models?.find((m) => m.name === ui.modelPicker.value) ?? info?.model;
}

// The picker holds every model the server has (the default first chosen, or ?model=NAME's); it is
// shown only when there is a choice, or to say that the preset names no model here.
function showModels(data) {
  const models = data.models ?? [data.model];
  const wanted = presets.get("model");
  const preset = models.find((m) => m.name === wanted);
  const chosen = preset ?? models.find((m) => m.default) ?? models[0];
  ui.modelPicker.replaceChildren(...models.map((m) => {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = modelLabel(m);
    return option;
  }));
  ui.modelPicker.value = chosen.name;
  ui.modelNote.textContent = wanted !== null && !preset
    ? `There is no model “${wanted}” here; this is ${chosen.name}.` : "";
  ui.modelField.hidden = models.length < 2 && !ui.modelNote.textContent;
  describeModel(chosen);
}

ui.modelPicker.addEventListener("change", () => {
  ui.modelNote.textContent = "";
  const m = selectedModel();
  if (m) describeModel(m);
  announce(`Model ${ui.modelPicker.value} chosen.`);
});

async function loadInfo() {
  // Bounded: while the server is loading (503) or unreachable, retry for about a minute.
  for (let attempt = 0; attempt < 30; attempt++) {
    try {
      info = await getInfo();
      showModels(info);
      applyDefaults(info);
      setInspectLimit(info.limits?.max_inspect_chars);
      if (ui.apiKeyField && info.engine?.api_key_required) ui.apiKeyField.hidden = false;
      return;
    } catch (e) {
      ui.model.textContent = e instanceof ApiError && e.kind === "loading" ? "model loading…" : "server unreachable, retrying…";
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
  ui.model.textContent = "model unavailable";
}

// ---------------------------------------------------------------- turns

function contextOf(prompt) {
  if (compact) return prompt;
  // the end of the prompt, so the continuation reads on from it
  const lines = prompt.split("\n");
  let last = lines.pop();
  if (last === "" && lines.length) last = `${lines.pop()}\n`;
  return last.length > 60 ? `…${last.slice(-60)}` : last;
}

class Turn {
  constructor(prompt) {
    this.prompt = prompt;
    this.node = ui.template.content.firstElementChild.cloneNode(true);
    const q = (selector) => this.node.querySelector(selector);
    this.answerBox = q(".answer");
    this.answer = new Answer(q(".generated"));
    this.context = q(".context");
    this.error = q(".error");
    this.finish = q(".finish");
    this.speed = q(".speed");
    this.seed = q(".seed");
    this.buttons = [...this.node.querySelectorAll(".actions button")];
    this.model = undefined; // the model that wrote the answer (undefined: the server's default)
    this.scoredFor = null; // the answer text whose probabilities were asked for after it was shown
    const shown = q(".prompt-text");
    shown.textContent = prompt === "" ? "(empty prompt: the model starts a new text)" : prompt;
    shown.classList.toggle("empty", prompt === "");
    this.context.textContent = contextOf(prompt);
    q(".regenerate").addEventListener("click", () => start(this, prompt, { fresh: true }));
    q(".continue").addEventListener("click", () => start(this, this.continuation(), { fresh: false }));
    q(".copy").addEventListener("click", (e) => copy(e.currentTarget, this.prompt + this.answer.text));
    q(".inside-open").addEventListener("click", () => openInside({ text: this.prompt + this.answer.text, model: this.model }));
  }

  // The prompt for "Continue": prompt and answer so far, cut to the server's prompt limit from the
  // left (the recurrent state mostly depends on the recent text anyway).
  continuation() {
    const text = this.prompt + this.answer.text;
    const limit = info?.limits?.max_prompt_chars;
    return limit && text.length > limit ? text.slice(-limit) : text;
  }

  begin(fresh) {
    this.node.dataset.state = "streaming";
    this.node.setAttribute("aria-busy", "true");
    this.error.hidden = true;
    this.error.textContent = "";
    for (const el of [this.finish, this.speed, this.seed]) el.textContent = "";
    this.finish.dataset.reason = "";
    if (fresh) this.answer.clear();
    this.answerBox.removeAttribute("tabindex");
  }

  end(state) {
    this.node.dataset.state = state;
    this.node.removeAttribute("aria-busy");
    const empty = this.answer.text === "";
    this.node.querySelector(".continue").hidden = empty;
    this.node.querySelector(".copy").hidden = empty;
    this.node.querySelector(".inside-open").hidden = empty;
    this.showScored();
  }

  showScored() {
    if (this.answer.scored) {
      // focusable, so the probability tooltip can be walked with the arrow keys
      this.answerBox.tabIndex = 0;
      this.answerBox.setAttribute("aria-describedby", "answer-help");
    }
  }

  // The probabilities of an answer that was shown without them (all or in part): the server scores
  // the prompt and the answer as one text, which gives each answer character the probability the
  // model gave it when writing it (the sampling settings change the pick, not these figures).
  async score() {
    const text = this.answer.text;
    if (text === "" || this.answer.complete || this.scoredFor === text || running?.turn === this) return;
    if (this.formatted) {
      // /v1/score knows no format: its figures would not be those the answer was drawn from (after the mask)
      if (this.error.hidden) this.showError("Probabilities of a formatted answer are shown when asked for before it is written.", "note");
      return;
    }
    this.scoredFor = text;
    const context = Array.from(this.prompt === "" ? "\n" : this.prompt); // an empty prompt starts after a newline
    const whole = [...context, ...Array.from(text)];
    const limit = info?.limits?.max_prompt_chars;
    const cut = limit && whole.length > limit ? whole.length - limit : 0; // the start goes, as in continuation()
    const body = { text: whole.slice(cut).join(""), top_logprobs: LOGPROBS };
    if (this.model) body.model = this.model;
    let scored;
    try {
      scored = await score(body, { apiKey: ui.apiKey?.value.trim() || undefined });
    } catch (e) {
      this.scoredFor = null; // the next tick tries again
      if (this.error.hidden) this.showError(`No probabilities for this answer: ${describe(e)}`, "note");
      return;
    }
    if (this.answer.text !== text || running?.turn === this) return; // regenerated or continued meanwhile
    const start = context.length - cut; // offsets count characters of the text sent
    const scores = new Array(whole.length - context.length).fill(null);
    for (const lp of scored.logprobs) {
      const i = lp.offset - start;
      if (i >= 0 && i < scores.length && lp.logprob !== null) scores[i] = lp;
    }
    this.answer.showScores(scores);
    this.showScored();
  }

  done(event) {
    const choice = event.choices?.[0] ?? {};
    const reason = choice.finish_reason ?? "unknown";
    // a formatted answer (the choice says whether it is `incomplete`) stops once its format is matched
    let why = choice.incomplete === false && reason === "stop" ? "the format is complete" : FINISH[reason];
    if (choice.incomplete) why = `${why ? `${why}; ` : ""}the format was not finished`;
    this.finish.dataset.reason = reason;
    this.finish.textContent = `finish: ${reason}${why ? ` (${why})` : ""}`;
    const cps = event.timings?.chars_per_second;
    this.speed.textContent = cps ? `${Math.round(cps).toLocaleString("en")} chars/s` : "";
    if (event.seed !== undefined) this.seed.textContent = `seed ${event.seed}`;
    if (event.model && info?.models?.length > 1) this.seed.textContent += ` · ${event.model}`;
    if (event.model) this.model = event.model;
    const dropped = event.usage?.dropped_chars;
    if (dropped) {
      this.showError(`${dropped} character${dropped > 1 ? "s" : ""} of the prompt ${dropped > 1 ? "are" : "is"} not in the model's vocabulary and ${dropped > 1 ? "were" : "was"} left out.`, "note");
    }
    this.end("done");
    announce(`Answer complete: ${this.answer.text.length} characters, ${this.finish.textContent}.`);
  }

  stopped() {
    this.finish.dataset.reason = "stopped";
    this.finish.textContent = `stopped by you after ${this.answer.text.length.toLocaleString("en")} characters`;
    this.end("stopped");
    announce("Generation stopped.");
  }

  failed(error) {
    // what the page itself found wrong with a setting is said as it is; anything else is explained
    this.showError(error instanceof SettingsError ? error.message : describe(error));
    this.finish.dataset.reason = "error";
    this.end("error");
    if (error instanceof ApiError && error.kind === "refused") {
      markInvalid(FIELDS[error.param]);
      showFormatError(error);
    }
    if (error instanceof SettingsError) markInvalid(error.control);
  }

  showError(message, kind = "error") {
    this.error.textContent = message;
    this.error.dataset.kind = kind;
    this.error.hidden = false;
  }
}

function announce(message) {
  if (ui.announce) ui.announce.textContent = message;
}

async function copy(button, text) {
  const label = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    // clipboard API refused (plain http on another host): select the text so Ctrl+C works
    const range = document.createRange();
    range.selectNodeContents(button.closest(".turn").querySelector(".answer"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    button.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => { button.textContent = label; }, 1500);
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  for (const button of ui.transcript.querySelectorAll(".actions button")) button.disabled = busy;
  if (busy) ui.stop.focus({ preventScroll: true });
}

function following() {
  const box = compact ? ui.transcript : document.scrollingElement;
  return box.scrollHeight - box.scrollTop - box.clientHeight < 120;
}

function scrollToEnd() {
  const box = compact ? ui.transcript : document.scrollingElement;
  box.scrollTop = box.scrollHeight;
}

// ---------------------------------------------------------------- generating

async function start(turn, prompt, { fresh }) {
  if (running) return;
  let settings;
  try {
    settings = requestSettings();
  } catch (e) {
    turn.begin(false);
    turn.failed(e);
    return;
  }
  const controller = new AbortController();
  running = { controller, turn };
  turn.model = settings.model;
  turn.formatted = "regex" in settings || "grammar" in settings;
  clearFormatError();
  setBusy(true);
  turn.begin(fresh);
  const apiKey = ui.apiKey?.value.trim() || undefined;
  try {
    const stream = generate({ ...settings, prompt }, { signal: controller.signal, apiKey });
    for (;;) {
      const { value, done } = await stream.next();
      if (done) {
        turn.done(value);
        break;
      }
      const follow = following();
      turn.answer.append(value.text, value.logprobs);
      if (follow) scrollToEnd();
    }
  } catch (e) {
    if (e.name === "AbortError") turn.stopped();
    else turn.failed(e);
  } finally {
    running = null;
    setBusy(false);
    if (ui.probabilities?.checked) scoreShown(); // the box may have been ticked while this one was written
    if (!compact || document.activeElement === ui.stop || document.activeElement === document.body) {
      ui.prompt.focus({ preventScroll: true });
    }
  }
}

// A prompt over the server's limit is refused here, and stays in the box to be shortened.
function tooLong(prompt) {
  const limit = info?.limits?.max_prompt_chars;
  const length = Array.from(prompt).length; // counted as the server counts: by code point
  if (!limit || length <= limit) return false;
  ui.promptError.textContent = `This prompt has ${length.toLocaleString("en")} characters; the server takes at most ${
    limit.toLocaleString("en")}. Shorten it, then send it again.`;
  ui.promptError.hidden = false;
  ui.prompt.setAttribute("aria-invalid", "true");
  return true;
}

function send() {
  if (running) return;
  const prompt = ui.prompt.value;
  if (tooLong(prompt)) return;
  ui.promptError.hidden = true;
  const turn = new Turn(prompt);
  turns = compact ? [turn] : [...turns, turn];
  if (compact) ui.transcript.replaceChildren(turn.node);
  else {
    ui.intro?.remove();
    ui.transcript.append(turn.node);
    ui.prompt.value = "";
  }
  scrollToEnd();
  start(turn, prompt, { fresh: true });
}

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});

ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});

ui.stop.addEventListener("click", () => running?.controller.abort());
// Escape stops the generation, unless it is closing something (a dialog, a tip, a drop-down list) or
// belongs to another field you type into or choose from (a slider, a checkbox or a button gives it no meaning).
const TYPED = new Set(["text", "search", "number", "email", "url", "tel", "password"]);
document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape" || !running || e.defaultPrevented || document.querySelector("dialog[open]")) return;
  const field = document.activeElement;
  const ownsEscape = field?.matches("select, textarea") || (field instanceof HTMLInputElement && TYPED.has(field.type));
  if (field !== ui.prompt && ownsEscape) return;
  running.controller.abort();
});
ui.prompt.addEventListener("input", () => { ui.promptError.hidden = true; });

ui.temperature.addEventListener("input", () => {
  ui.temperature.dataset.chosen = "true";
  showTemperature();
});
const tips = new ProbabilityTips(ui.transcript, ui.tip, () => ui.probabilities?.checked);
// The composer sticks to the bottom of the window: what is scrolled into view (a character walked to,
// a focused button) stops above it.
if (!compact) {
  new ResizeObserver(() => document.documentElement.style.setProperty("scroll-padding-bottom", `${ui.composer.offsetHeight}px`))
    .observe(ui.composer);
}
// Ticking the box shades the answers already on screen too (those written without probabilities are
// scored first); unticking hides the shading of every answer.
function scoreShown() {
  for (const turn of turns) turn.score();
}

ui.probabilities?.addEventListener("change", () => {
  document.body.classList.toggle("show-probabilities", ui.probabilities.checked);
  tips.hide();
  if (ui.probabilities.checked) scoreShown();
});

if (presets.has("prompt")) ui.prompt.value = presets.get("prompt");
showTemperature();
document.body.classList.toggle("show-probabilities", Boolean(ui.probabilities?.checked));
loadInfo();
