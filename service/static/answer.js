// One answer's generated text, and the probability view over it.
// Text goes in as text nodes (textContent, appendData), never as HTML.

const TOP_SHOWN = 5; // alternatives in the tooltip

// How a character looks in the tooltip: the invisible ones get a visible stand-in.
export function visible(char) {
  if (char === " ") return "␣ space";
  if (char === "\n") return "↵ new line";
  if (char === "\t") return "⇥ tab";
  const code = char.codePointAt(0);
  if (code < 32 || code === 127) return `U+${code.toString(16).toUpperCase().padStart(4, "0")}`;
  return char;
}

// How dark a character's background is: squared, so that the many characters a model is only
// fairly sure of stay light and the real surprises stand out.
export function shade(p) {
  return 0.75 * (1 - p) ** 2;
}

export function percent(p) {
  if (p >= 0.995) return `${(p * 100).toFixed(1)}%`;
  if (p >= 0.001) return `${(p * 100).toFixed(p >= 0.1 ? 0 : 1)}%`;
  return "<0.1%";
}

export class Answer {
  constructor(element) {
    this.element = element; // the .generated span
    this.text = "";
    this.scored = 0; // characters that came with probabilities
    this.plain = null; // the text node plain chunks are appended to
  }

  clear() {
    this.element.replaceChildren();
    this.text = "";
    this.scored = 0;
    this.plain = null;
  }

  // logprobs: one {char, logprob, top: [{char, logprob}]} per character, or undefined.
  append(text, logprobs) {
    this.text += text;
    if (!logprobs || logprobs.length === 0) {
      if (!this.plain) {
        this.plain = document.createTextNode("");
        this.element.append(this.plain);
      }
      this.plain.appendData(text);
      return;
    }
    this.plain = null;
    const fragment = document.createDocumentFragment();
    for (const lp of logprobs) {
      const span = document.createElement("span");
      span.className = "ch";
      span.textContent = lp.char;
      const p = Math.exp(lp.logprob);
      span.dataset.p = p.toPrecision(4);
      // CSSOM, not a style attribute: allowed by the page's CSP.
      span.style.setProperty("--shade", shade(p).toFixed(3));
      span.top = lp.top;
      fragment.append(span);
    }
    this.scored += logprobs.length;
    this.element.append(fragment);
  }

  // Probabilities for a text shown without them (the box was ticked afterwards): scores[i] is the
  // {logprob, top} of the text's i-th character, or null where the server has none. The text stays
  // as it is; only its characters are rebuilt, shaded where they have a score.
  showScores(scores) {
    const chars = Array.from(this.text);
    this.clear();
    chars.forEach((char, i) => {
      const s = scores[i];
      this.append(char, s ? [{ char, logprob: s.logprob, top: s.top }] : undefined);
    });
  }

  // Every character came with its probability (counted as the server counts: by code point).
  get complete() {
    return this.scored === Array.from(this.text).length;
  }

  get characters() {
    return this.element.querySelectorAll(".ch");
  }
}

// The tooltip over shaded characters: on hover, and from the keyboard (focus an answer, then the
// arrow keys walk through its characters).
// A tooltip beside the rectangle r ({left, top, bottom} in the viewport): below it, or above where
// there is no room, and never past the screen's edges.
export function placeTip(tip, r) {
  const t = tip.getBoundingClientRect();
  const left = Math.max(8, Math.min(r.left, window.innerWidth - t.width - 8));
  const below = r.bottom + 6;
  const top = below + t.height > window.innerHeight - 8 ? r.top - t.height - 6 : below;
  tip.style.left = `${left}px`;
  tip.style.top = `${Math.max(8, top)}px`;
}

export class ProbabilityTips {
  constructor(root, tip, isOn) {
    this.tip = tip;
    this.isOn = isOn;
    this.current = null;
    root.addEventListener("mouseover", (e) => {
      const span = e.target.closest?.(".ch");
      if (span && this.isOn()) this.show(span);
    });
    root.addEventListener("mouseout", (e) => {
      if (e.target.closest?.(".ch") && !e.relatedTarget?.closest?.("#tip")) this.hide();
    });
    root.addEventListener("focusin", (e) => {
      const answer = e.target.closest?.(".answer");
      if (answer && this.isOn()) {
        const first = answer.querySelector(".ch");
        if (first) this.show(first);
      }
    });
    root.addEventListener("focusout", () => this.hide());
    root.addEventListener("keydown", (e) => this.key(e));
    // the tip of a character walked to from the keyboard follows it (its walk scrolls it into view)
    window.addEventListener("scroll", () => (this.walking() ? this.place(this.current) : this.hide()), { passive: true });
  }

  walking() {
    return Boolean(this.current && document.activeElement?.contains(this.current));
  }

  key(e) {
    if (!this.current || !e.target.classList?.contains("answer")) return;
    const spans = [...e.target.querySelectorAll(".ch")];
    let i = spans.indexOf(this.current);
    if (e.key === "ArrowRight" || e.key === "ArrowDown") i += 1;
    else if (e.key === "ArrowLeft" || e.key === "ArrowUp") i -= 1;
    else if (e.key === "Home") i = 0;
    else if (e.key === "End") i = spans.length - 1;
    else if (e.key === "Escape") {
      e.preventDefault(); // closes the tip, and nothing else
      return this.hide();
    } else return;
    e.preventDefault();
    this.show(spans[Math.max(0, Math.min(spans.length - 1, i))], { walk: true });
  }

  // walk: the span was reached from the keyboard, and is scrolled into view if need be
  show(span, { walk = false } = {}) {
    this.current?.classList.remove("current");
    this.current = span;
    span.classList.add("current");
    const p = Number(span.dataset.p);
    const head = document.createElement("p");
    head.className = "tip-head";
    const picked = document.createElement("strong");
    picked.textContent = visible(span.textContent);
    head.append(picked, `: the model gave it ${percent(p)}`);
    const list = document.createElement("ol");
    list.className = "tip-list";
    for (const alt of (span.top || []).slice(0, TOP_SHOWN)) {
      const q = Math.exp(alt.logprob);
      const row = document.createElement("li");
      if (alt.char === span.textContent) row.className = "picked";
      const name = document.createElement("span");
      name.className = "alt-char";
      name.textContent = visible(alt.char);
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${Math.max(1, q * 100).toFixed(1)}%`;
      bar.append(fill);
      const value = document.createElement("span");
      value.className = "alt-p";
      value.textContent = percent(q);
      row.append(name, bar, value);
      list.append(row);
    }
    const caption = document.createElement("p");
    caption.className = "tip-caption";
    caption.textContent = "Most likely next characters:";
    this.tip.replaceChildren(head, caption, list);
    if (walk) span.scrollIntoView({ block: "nearest" });
    this.tip.hidden = false;
    this.place(span);
  }

  place(span) {
    placeTip(this.tip, span.getBoundingClientRect());
  }

  hide() {
    this.current?.classList.remove("current");
    this.current = null;
    this.tip.hidden = true;
  }
}
