// The page's side of the HTTP API: /info, /v1/generate streamed as server-sent events, and
// /v1/score for the probabilities of a reply shown without them.
// fetch with a streamed body rather than EventSource, which cannot POST; aborting the fetch closes
// the connection, which is how the server learns to free the stream's slot at once.

export class ApiError extends Error {
  // kind: "refused" (4xx about the request), "busy" (429), "loading" (503), "auth" (401),
  // "server" (5xx or an error event), "gone" (no connection, or it broke mid-answer).
  constructor(kind, message, { status = 0, param = null, code = null, retryAfter = null } = {}) {
    super(message);
    this.kind = kind;
    this.status = status;
    this.param = param;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function headers(apiKey) {
  const h = { "Content-Type": "application/json", Accept: "text/event-stream" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let param = null;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) ({ message, param, code } = body.error);
  } catch {
    // not our JSON error shape (a proxy's page): keep the status line
  }
  const retry = Number(response.headers.get("Retry-After"));
  const retryAfter = Number.isFinite(retry) && retry > 0 ? retry : null;
  const kind = response.status === 429 ? "busy"
    : response.status === 503 ? "loading"
    : response.status === 401 ? "auth"
    : response.status >= 500 ? "server" : "refused";
  return new ApiError(kind, message, { status: response.status, param, code, retryAfter });
}

export async function getInfo(signal) {
  let response;
  try {
    response = await fetch("/info", { signal, headers: { Accept: "application/json" } });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("gone", "The server cannot be reached.");
  }
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

// Builds the JSON body by hand only for the seed: a seed above 2^53 would lose digits as a JS number.
function encode(body) {
  const { seed, ...rest } = body;
  const json = JSON.stringify(rest);
  if (seed === undefined) return json;
  return `${json.slice(0, -1)}${json.length > 2 ? "," : ""}"seed":${seed}}`;
}

// Yields {text, logprobs} for each chunk, then returns the final "done" event.
// body.seed, when given, must be a string of decimal digits.
export async function* generate(body, { signal, apiKey } = {}) {
  let response;
  try {
    response = await fetch("/v1/generate", {
      method: "POST", headers: headers(apiKey), body: encode({ ...body, stream: true }), signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("gone", "The server cannot be reached.");
  }
  if (!response.ok) throw await errorFrom(response);

  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        if (e.name === "AbortError") throw e;
        throw new ApiError("gone", "The connection to the server broke in the middle of the answer.");
      }
      if (chunk.done) break;
      buffer += chunk.value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!block.startsWith("data: ")) continue;
        const event = JSON.parse(block.slice(6));
        if (event.error) {
          throw new ApiError("server", event.error.message, { code: event.error.code });
        }
        if (event.done) return event;
        yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
  throw new ApiError("gone", "The server ended the answer early (it may have restarted).");
}

// Each character's log-probability in `body.text` (POST /v1/score with logprobs), as the server answers it.
export async function score(body, { apiKey } = {}) {
  let response;
  try {
    response = await fetch("/v1/score", {
      method: "POST", headers: { ...headers(apiKey), Accept: "application/json" },
      body: JSON.stringify({ ...body, logprobs: true }),
    });
  } catch {
    throw new ApiError("gone", "The server cannot be reached.");
  }
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

// The network's values over `body.text` (POST /v1/inspect), for the page's Inside view.
export async function inspect(body, { signal, apiKey } = {}) {
  let response;
  try {
    response = await fetch("/v1/inspect", {
      method: "POST", headers: { ...headers(apiKey), Accept: "application/json" }, body: JSON.stringify(body), signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("gone", "The server cannot be reached.");
  }
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

// The error in plain words for the person at the page; the server's own message where it has one.
export function describe(error) {
  if (!(error instanceof ApiError)) return `Something went wrong in the page: ${error.message}`;
  switch (error.kind) {
    case "refused":
      return `The server did not accept these settings: ${error.message}`;
    case "busy":
      return `The server is busy (every generation slot is taken). Try again${
        error.retryAfter ? ` in ${error.retryAfter} s` : " shortly"}.`;
    case "loading":
      return "The model is still loading. Try again in a few seconds.";
    case "auth": // only / has a key field: the embed cannot send one
      return document.getElementById("api-key") ? "This server needs an API key: enter it under Advanced."
        : "This server needs an API key, and this embedded page cannot send one: it works only with a server that needs none.";
    case "gone":
      return `${error.message} Check that it is running, then try again.`;
    default:
      return `The server had a problem: ${error.message}`;
  }
}
