// The page's "Format" control: a regular expression or a GBNF grammar that the answer must match,
// exactly (POST /v1/generate's `regex` and `grammar`). The server masks, at every character, the
// characters that cannot continue a match; a pattern it cannot compile comes back as a 422, shown
// here under the box. Ready examples are offered only when the loaded model's vocabulary (read
// through /v1/detokenize) has every character they must write.

const $ = (id) => document.getElementById(id);

const ui = {
  example: $("format-example"), kind: $("format-kind"), pattern: $("format-pattern"), error: $("format-error"),
  maxChars: $("max-chars"), details: $("format"),
};

const UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const LOWER = "abcdefghijklmnopqrstuvwxyz";

// `needs`: the characters the example must write, as sets of which the model must have at least one
// (a class such as [A-Z] needs one of its own; . any character but the newline). `maxChars`: enough
// characters for a whole match, set in Max characters when the example is picked.
export const EXAMPLES = {
  fourteen: {
    label: "Fourteen lines (a sonnet's shape)", kind: "regex", needs: ["\n"], maxChars: 900,
    pattern: String.raw`(.{10,60}\n){14}`,
  },
  speaker: {
    label: "A speaker, then one line", kind: "grammar", needs: [":", "\n", UPPER, LOWER], maxChars: 200,
    pattern: [
      "# a name in capitals, a colon, then one line of speech",
      "root    ::= speaker \":\\n\" line \"\\n\"",
      "speaker ::= [A-Z] [A-Z]+ (\" \" [A-Z]+)?",
      "line    ::= [A-Z] [a-z ,;'!?.]{10,80}",
    ].join("\n"),
  },
  acrostic: {
    label: "Acrostic: ROMEO", kind: "regex", needs: ["R", "O", "M", "E", "\n"], maxChars: 400,
    pattern: String.raw`R.{8,60}\nO.{8,60}\nM.{8,60}\nE.{8,60}\nO.{8,60}\n`,
  },
  name: {
    label: "A name (a capital, then 2 to 9 letters)", kind: "regex", needs: [UPPER, LOWER], maxChars: 10,
    pattern: "[A-Z][a-z]{2,9}",
  },
};

// Whether a model with these characters can write the example.
function fits(example, vocabulary) {
  return example.needs.every((set) => Array.from(set).some((c) => vocabulary.has(c)));
}

async function vocabularyOf(model, size) {
  const ids = Array.from({ length: size }, (_, i) => i);
  const body = { ids };
  if (model) body.model = model;
  const response = await fetch("/v1/detokenize", {
    method: "POST", headers: { "Content-Type": "application/json", Accept: "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) return null;
  return new Set(Array.from((await response.json()).text));
}

// The examples the model `model` (of `size` characters; null: the default) can write, in the picker.
export async function offerExamples(model, size) {
  if (!ui.example) return;
  let vocabulary = null;
  try {
    vocabulary = size ? await vocabularyOf(model, size) : null;
  } catch {
    vocabulary = null; // no list: every example is offered, and the server says which characters are missing
  }
  const options = [new Option("Free text (no format)", "")];
  for (const [key, example] of Object.entries(EXAMPLES)) {
    if (!vocabulary || fits(example, vocabulary)) options.push(new Option(example.label, key));
  }
  const chosen = ui.example.value;
  ui.example.replaceChildren(...options);
  ui.example.value = options.some((o) => o.value === chosen) ? chosen : "";
}

function clearError() {
  ui.error.textContent = "";
  ui.error.hidden = true;
  ui.pattern.removeAttribute("aria-invalid");
}

// The request fields of the format (none when the box is empty).
export function formatSettings() {
  if (!ui.pattern) return {};
  const pattern = ui.pattern.value;
  if (pattern.trim() === "") return {};
  return ui.kind.value === "grammar" ? { grammar: pattern } : { regex: pattern };
}

// The control a 422 about `regex` or `grammar` names, for the page's usual marking.
export function formatControls() {
  return ui.pattern ? { regex: ui.pattern, grammar: ui.pattern } : {};
}

// A refusal of the format (the server's message), shown under the box; false when it is about something else.
export function showFormatError(error) {
  if (!ui.error || !error || !["regex", "grammar"].includes(error.param)) return false;
  ui.error.textContent = error.message;
  ui.error.hidden = false;
  ui.pattern.setAttribute("aria-invalid", "true");
  if (ui.details) ui.details.open = true;
  return true;
}

export function clearFormatError() {
  if (ui.error) clearError();
}

if (ui.example) {
  ui.example.addEventListener("change", () => {
    const example = EXAMPLES[ui.example.value];
    clearError();
    if (!example) {
      ui.pattern.value = "";
      return;
    }
    ui.kind.value = example.kind;
    ui.pattern.value = example.pattern;
    if (ui.maxChars && example.maxChars) ui.maxChars.value = String(example.maxChars);
  });
  ui.pattern.addEventListener("input", () => {
    clearError();
    ui.example.value = "";
  });
  ui.kind.addEventListener("change", () => {
    clearError();
    ui.example.value = "";
  });
}
