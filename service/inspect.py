"""POST /v1/inspect: the network's values after each character of a text, for the page's "Inside" view
and for tools. model/runtime/inside.py computes them with numpy from the model's own model.onnx,
outside the engine loop: generation never waits for an inspection, and an inspection never takes a
batch slot. Each worker reads a model's weights once, on its first inspection.

Bounded work: the text is at most inside.MAX_CHARS characters, an answer at most
MAX_INSPECT_VALUES values, and at most MAX_RUNNING inspections run at once in a worker (the others
wait for one to end, then answer 429).

What a model lacks (a layer beyond its last, `cell` or a gate its cell type does not have) is a 404
naming it, as an unknown model is: the request is well formed (/openapi.json lists every cell
type's names) but names something this model does not have.
"""

from __future__ import annotations

import base64
import threading

import numpy as np
from flask import Blueprint, current_app, jsonify

from service.api import authorize, reading, state
from service.errors import ApiError, bad_field, queue_full
from service.reading import read_json
from service.schemas import MAX_INSPECT_VALUES

bp = Blueprint("inspect", __name__, url_prefix="/v1")
bp.before_request(authorize)

MAX_RUNNING = 2  # inspections at once per worker: each holds its arrays (up to a few hundred MB) and a core
WAIT_SECONDS = 10.0  # how long one waits for another to end before a 429
TOP = 5  # alternatives per position in `next`
_running = threading.BoundedSemaphore(MAX_RUNNING)
_loading = threading.Lock()


def network_of(served):
    """The served model's weights as inside.Network, read from its model.onnx once per worker and
    again when the model is reloaded (a new Artifact)."""
    from model.runtime.inside import Network

    networks = current_app.extensions.setdefault("chargen_inside", {})  # name -> (artifact, network)
    artifact = served.artifact
    with _loading:
        known = networks.get(served.name)
        if known is None or known[0] is not artifact:
            config = artifact.config
            networks[served.name] = known = (artifact, Network.from_graph(artifact.onnx_path, config.cell, config.layers))
        return known[1]


def _not_found(param: str, message: str, code: str) -> ApiError:
    return ApiError(404, message, param=param, code=code)


def encode(values: np.ndarray, encoding: str):
    """(T, H) float32 as the request's encoding asks."""
    if encoding == "float16":
        data = np.ascontiguousarray(values, "<f2").tobytes()
        return {"shape": list(values.shape), "dtype": "float16", "data": base64.b64encode(data).decode("ascii")}
    return np.round(values.astype(np.float64), 4).tolist()


@bp.post("/inspect")
def inspect():
    from model.runtime.cells import report, statistics
    from model.runtime.inside import GATES, Trace, probabilities

    st = state()
    req = read_json(st.schemas.inspect)
    served = st.served(req.model)
    served.require_ready()
    config, vocab = served.artifact.config, served.artifact.vocab
    cell_type, L, H = config.cell, config.layers, config.units

    layers = sorted(set(req.layers)) if req.layers else list(range(1, L + 1))
    beyond = [i for i in layers if i > L]
    if beyond:
        raise _not_found("layers", f"layer {beyond[0]}: the model {served.name!r} has {L} layer{'s' if L > 1 else ''} (1 to {L})",
                         "layer_not_found")
    has = ("hidden", "cell", "gates") if cell_type == "lstm" else ("hidden", "gates")
    quantities = list(dict.fromkeys(req.quantities)) if req.quantities else list(has)
    if "cell" in quantities and cell_type != "lstm":
        raise _not_found("quantities", f"the model {served.name!r} is a {cell_type}, which has no cell state (only an lstm has one)",
                         "quantity_not_found")
    gates = list(GATES[cell_type]) if "gates" in quantities else []
    if req.gates is not None:
        lacking = [g for g in req.gates if g not in GATES[cell_type]]
        if lacking:
            raise _not_found("gates", f"the model {served.name!r} is a {cell_type}, which has no {lacking[0]!r} gate "
                                      f"(its gates: {', '.join(GATES[cell_type])})", "quantity_not_found")
        gates = [g for g in GATES[cell_type] if g in req.gates]

    read = reading(req.text, vocab)
    T = len(read.ids)
    arrays = ("hidden" in quantities) + ("cell" in quantities) + len(gates)
    values = T * H * arrays * len(layers)
    if values > MAX_INSPECT_VALUES:
        raise bad_field(None, f"the answer would hold {values:,} values ({T} characters x {H} units x {arrays} arrays per layer "
                              f"x {len(layers)} layer{'s' if len(layers) > 1 else ''}), more than {MAX_INSPECT_VALUES:,}: ask for "
                              "fewer layers, quantities or gates, or a shorter text", "too_large")

    if not _running.acquire(timeout=WAIT_SECONDS):
        raise queue_full()
    try:
        network = network_of(served)
        chars = [vocab.chars[i] for i in read.ids]
        body = {"model": served.name, "cell_type": cell_type, "units": H, "num_layers": L, "chars": chars,
                "offsets": read.offsets, "replaced": [{"offset": o, "char": c, "as": a} for o, c, a in read.replaced],
                "dropped": [{"offset": o, "char": c} for o, c in read.dropped], "layers": [], "next": []}
        if T == 0:  # nothing the model knows: nothing read, nothing predicted
            body["layers"] = [{"layer": i} for i in layers]
        else:
            ids = np.asarray(read.ids, np.int64)
            if req.cells:  # the statistics trace every layer and gate, in pieces: keep what was asked for from them
                pieces = []
                found = report(statistics(network, ids, chars, each=lambda t: pieces.append(t.kept(set(layers), set(gates)))),
                               req.cells)
                trace = Trace.joined(pieces)
            else:
                found, trace = {}, network.trace(ids, set(layers), set(gates))
            for i in layers:
                t = trace.layers[i - 1]
                entry = {"layer": i}
                if "hidden" in quantities:
                    entry["hidden"] = encode(t.hidden, req.encoding)
                if "cell" in quantities:
                    entry["cell"] = encode(t.cell, req.encoding)
                if gates:
                    entry["gates"] = {g: encode(t.gates[g], req.encoding) for g in gates}
                body["layers"].append(entry)
            body["next"] = _next(probabilities(trace.logits), read.ids, vocab.chars)
            body.update(found)
        return jsonify(body)
    finally:
        _running.release()


def _next(p: np.ndarray, ids: list[int], chars: list[str]) -> list[dict]:
    """Per position t: the character that came next and its probability (null after the last), and
    the TOP most likely characters, from the prediction after reading ids[0..t]."""
    top = np.argsort(-p, axis=1, kind="stable")[:, :TOP]
    out = []
    for t in range(len(ids)):
        nxt = ids[t + 1] if t + 1 < len(ids) else None
        out.append({"char": None if nxt is None else chars[nxt], "p": None if nxt is None else round(float(p[t, nxt]), 4),
                    "top": [[chars[j], round(float(p[t, j]), 4)] for j in top[t]]})
    return out
