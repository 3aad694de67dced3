"""Generation speed, side by side in one run: the engine against the bare ONNX Runtime loop it is
built on, for the float32 graph (model.onnx) and the int8 graph (model.int8.onnx) when the artifact
has one; naive windowed predict and TensorFlow's stateful OneStep; OpenVINO's runtime on the same
graphs; prompt consumption; memory. Prints one table and the goals; see bench/README.md.

    .venv/bin/python bench/generation.py [--artifact artifacts/default] [--seconds 6] [--rounds 3]
    .venv/bin/python bench/generation.py --precision float32   # one graph only (default: float32,int8)
    .venv/bin/python bench/generation.py --sessions      # the bare loop under other session settings too

  f  the bare ONNX Runtime loop: session.run() on the artifact's graph, one character per call
     for every stream, the states fed back, and the plain numpy sampler (model.runtime.sampling.pick, one
     generator's draws for all rows): 1, 8, 32 and 128 streams, on the sessions the engine uses
     (ONNX Runtime's threads not spinning; one thread below the engine's min_rows_per_thread rows
     (model/runtime/onnx_step.py), one per core from there)
  g  the lightest loop: as f, but on IO binding into buffers allocated once (the states swapped
     between two, as the engine does), and the sampler told that no row filters (top-k, top-p,
     min-p) or is greedy: what the engine adds to ONNX Runtime with nothing of its own left
  c  the engine, one stream; d  the engine, 8, 32 and 128 streams stepped together
  Each of f, g, c and d runs once per graph: float32 and int8 (the engine given the artifact loaded
     with that precision, as CHARGEN_PRECISION does); all take turns. The goals compare the
     engine with f; "engine / g" is printed beside them.
  o  OpenVINO's CPU runtime (PyPI `openvino`, the `bench` extra) running the same graph in the same
     bare loop, at 1, 8, 32 and 128 streams, taking turns with f of that graph (one thread below the
     engine's min_rows_per_thread rows, one per core from there, as f); left out, with a line
     saying so, when openvino is not installed
  a  naive: model.predict on the last 40 characters, once per character (keras.io / textgenrnn)
  b  OneStep: a stateful one-step tf.function carrying the states (the TensorFlow text generation
     tutorial), one stream;  e  OneStep with a batch of 32 streams
Rates are total characters per second over all streams. f, g and the engine take turns of 10 steps
(so a burst of other work on a shared machine hits both alike), --seconds in all per stream
count, in --rounds rounds; the table gives each one's median round and the median of the
per-round ratios. Every method samples at
temperature 0.8. Then: the time the engine takes to consume a 200- and a 4,000-character prompt
(one runtime call) and to give the first character after it, per graph; the resident memory of a
fresh process that loads the engine of one graph (as a serving worker does: no Keras, no
TensorFlow, no other graph) and generates 500 characters, per graph; last, with Keras loaded, a, b
and e (fixed small numbers of characters, best of three).
The share of the float32 rate counts the matrix-product FLOPs per character from the network's
shapes and divides by the rate of a large float32 matrix product measured in the same run.

When the artifact has no model.onnx yet, its graph is built from model.keras in a subprocess (so
this process still has no Keras when its memory is read) into a temporary file.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ["KERAS_BACKEND"] = "tensorflow"  # OneStep is TensorFlow's; the engine does not care
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

TEMPERATURE = 0.8
PROMPT = "ROMEO:\n"
STREAMS = (1, 8, 32, 128)
REPEATS = 3  # a, b and e: the best of this many runs
STEPS_PER_TURN = 10  # f, g and the engine take turns of this many steps
OLD_PROMPT_MS = 482.0  # a 4,000-character prompt on the compiled engine, one position after another (issue 11)
CORPUS = ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt"


def attainable_gflops(n: int = 2048, seconds: float = 3.0) -> float:
    """Best rate of a large float32 matrix product (numpy's BLAS, its default threads)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best / 1e9


def graph_path(artifact: Path) -> tuple[Path, str]:
    """The artifact's model.onnx, or one built from its model.keras in a subprocess (and a note)."""
    if (artifact / "model.onnx").is_file():
        return artifact / "model.onnx", ""
    out = Path(tempfile.mkdtemp(prefix="chargen-bench-")) / "model.onnx"
    code = ("import sys; from model.training import artifacts; from model.training.onnx_graph import build_graph; "
            "art = artifacts.load_keras(sys.argv[1]); open(sys.argv[2], 'wb').write(build_graph(art.model).SerializeToString())")
    subprocess.run([sys.executable, "-c", code, str(artifact), str(out)], check=True, cwd=ROOT, timeout=600)
    return out, f" (no model.onnx: graph built from model.keras into {out})"


def text_of(vocab, n: int) -> str:
    """n characters of English the vocabulary knows (the corpus if it is there)."""
    source = CORPUS.read_text(encoding="utf-8") if CORPUS.exists() else Path(__file__).read_text()
    known = vocab.decode(vocab.encode(source).ids)
    return (known * (1 + n // max(1, len(known))))[:n]


# ---------------------------------------------------------------- (f) the bare ONNX Runtime loop


class BareLoop:
    """`streams` streams on plain session.run() calls, primed with PROMPT."""

    def __init__(self, sess, names: list[str], layers: int, units: int, prompt_ids: np.ndarray, streams: int):
        from model.runtime.sampling import pick

        self.sess, self.names, self.streams, self.pick = sess, names, streams, pick
        self.outputs = ["logits"] + [f"{n}_out" for n in names]
        zero = {n: np.zeros((layers, streams, units), np.float32) for n in names}
        out = sess.run(self.outputs, {"ids": np.tile(prompt_ids.astype(np.int64), (streams, 1)), **zero})
        self.logits, self.state = out[0][:, -1], dict(zip(names, out[1:]))
        self.settings = (np.full(streams, TEMPERATURE), np.zeros(streams, np.int64), np.ones(streams))
        self.rng = np.random.default_rng(0)

    def run(self, steps: int) -> float:
        """Seconds that `steps` steps of every stream take."""
        sess, names, outputs, pick, settings, rng = self.sess, self.names, self.outputs, self.pick, self.settings, self.rng
        logits, state = self.logits, self.state
        t = time.perf_counter()
        for _ in range(steps):
            ids = pick(logits, *settings, rng.random(self.streams))
            out = sess.run(outputs, {"ids": ids[:, None], **state})
            logits, state = out[0][:, -1], dict(zip(names, out[1:]))
        elapsed = time.perf_counter() - t
        self.logits, self.state = logits, state
        return elapsed


class BoundLoop:
    """`streams` streams on run_with_iobinding() calls into fixed buffers, primed with PROMPT (g)."""

    def __init__(self, sess, names: list[str], layers: int, units: int, prompt_ids: np.ndarray, streams: int):
        import onnxruntime as ort

        from model.runtime.sampling import pick

        self.sess, self.streams, self.pick = sess, streams, pick
        out = sess.run(None, {"ids": np.tile(prompt_ids.astype(np.int64), (streams, 1)),
                              **{n: np.zeros((layers, streams, units), np.float32) for n in names}})
        self.ids = np.zeros((streams, 1), np.int64)
        self.logits = np.ascontiguousarray(out[0][:, -1:])  # (streams, 1, V), the runtime writes each step's here
        states = [(np.ascontiguousarray(a), np.empty_like(a)) for a in out[1:]]  # each state twice: read one, write the other
        value = ort.OrtValue.ortvalue_from_numpy
        self.bindings = []
        for which in (0, 1):
            binding = sess.io_binding()
            binding.bind_ortvalue_input("ids", value(self.ids))
            binding.bind_ortvalue_output("logits", value(self.logits))
            for name, pair in zip(names, states):
                binding.bind_ortvalue_input(name, value(pair[which]))
                binding.bind_ortvalue_output(f"{name}_out", value(pair[1 - which]))
            self.bindings.append(binding)
        self.which = 0
        self.temperature = np.full(streams, TEMPERATURE)
        self.rng = np.random.default_rng(0)

    def run(self, steps: int) -> float:
        """Seconds that `steps` steps of every stream take."""
        sess, bindings, ids, logits, pick, t, rng, n = (self.sess, self.bindings, self.ids, self.logits[:, 0], self.pick,
                                                         self.temperature, self.rng, self.streams)
        which = self.which
        start = time.perf_counter()
        for _ in range(steps):
            ids[:, 0] = pick(logits, t, None, None, rng.random(n), None, None, False)
            sess.run_with_iobinding(bindings[which])
            which ^= 1
        elapsed = time.perf_counter() - start
        self.which = which
        return elapsed


class OpenVinoSession:
    """A graph compiled by OpenVINO for the CPU, with the one method of an ONNX Runtime session that
    BareLoop calls, so (o) runs f's loop unchanged."""

    def __init__(self, compiled):
        self.request = compiled.create_infer_request()
        self.names = [port.get_any_name() for port in compiled.outputs]

    def run(self, outputs: list[str], feeds: dict) -> list[np.ndarray]:
        self.request.infer(feeds)
        return [self.request.get_output_tensor(self.names.index(name)).data.copy() for name in outputs]


def openvino_compiled(graph: Path, threads: set[int]) -> dict:
    """{threads: the graph compiled by OpenVINO for the CPU}; {} when openvino is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return {}
    core = ov.Core()
    model = core.read_model(str(graph))
    return {t: core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": t}) for t in threads}


RSS_CODE = r"""
import sys
from pathlib import Path
from model.runtime import artifact
from model.runtime.engine import Engine, GenerationRequest
from model.runtime.sampling import SamplingSettings
engine = Engine(artifact.load(sys.argv[1], sys.argv[2]), max_batch=int(sys.argv[3]))
engine.generate(GenerationRequest("ROMEO:\n", max_chars=500, sampling=SamplingSettings(0.8), seed=0))
status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
print(int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024, "keras" in sys.modules)
"""


def serving_rss(path: Path, precision: str, max_batch: int) -> tuple[float, float]:
    """(resident set, its peak) in MB of a fresh process that loads the engine of `precision`'s graph
    and generates 500 characters."""
    out = subprocess.run([sys.executable, "-c", RSS_CODE, str(path), precision, str(max_batch)], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rss, peak, keras = out.stdout.split()
    assert keras == "False", "the engine's load imported Keras"
    return float(rss), float(peak)


# ---------------------------------------------------------------- (c), (d) the engine


class EngineLoop:
    def __init__(self, engine, streams: int):
        from model.runtime.engine import GenerationRequest
        from model.runtime.sampling import SamplingSettings

        self.engine, self.streams = engine, streams
        self.batch = [engine.start(GenerationRequest(PROMPT, max_chars=10**9, sampling=SamplingSettings(TEMPERATURE), seed=i))
                      for i in range(streams)]

    def run(self, steps: int) -> float:
        """Seconds that `steps` steps of every stream take."""
        step, batch = self.engine.step, self.batch
        t = time.perf_counter()
        for _ in range(steps):
            step(batch)
        return time.perf_counter() - t

    def close(self) -> None:
        for s in self.batch:
            self.engine.cancel(s)


def prompt_ms(engine, prompt: str, repeats: int) -> tuple[float, float]:
    """Median milliseconds to consume `prompt` (engine.start) and to its first character."""
    from model.runtime.engine import GenerationRequest
    from model.runtime.sampling import SamplingSettings

    consumed, first = [], []
    for seed in range(repeats + 1):
        t = time.perf_counter()
        s = engine.start(GenerationRequest(prompt, max_chars=10, sampling=SamplingSettings(TEMPERATURE), seed=seed))
        started = time.perf_counter()
        engine.step([s])
        done = time.perf_counter()
        engine.cancel(s)
        if seed:  # the first is a warm-up
            consumed.append((started - t) * 1e3)
            first.append((done - t) * 1e3)
    return statistics.median(consumed), statistics.median(first)


def side_by_side(loops: dict, streams: int, seconds: float) -> dict:
    """Characters per second of each loop, run in turns of STEPS_PER_TURN steps for `seconds` in
    all: a burst of other work on a shared machine hits every loop alike."""
    spent = dict.fromkeys(loops, 0.0)
    turns = 0
    while sum(spent.values()) < seconds:
        for name, loop in loops.items():
            spent[name] += loop.run(STEPS_PER_TURN)
        turns += 1
    return {name: turns * STEPS_PER_TURN * streams / spent[name] for name in loops}


def memory_per_stream(engine, streams: int = 64) -> float:
    """Bytes of Python objects and arrays allocated per started stream (slot buffers are allocated
    by the engine up front and counted separately)."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    loop = EngineLoop(engine, streams)
    for _ in range(20):
        engine.step(loop.batch)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    loop.close()
    return used / streams


# ---------------------------------------------------------------- (a) naive, (b), (e) OneStep


def naive(model, vocab, chars: int) -> float:
    from model.runtime.sampling import SamplingSettings, next_ids

    settings, rng = SamplingSettings(TEMPERATURE), np.random.default_rng(0)
    ids = list(vocab.encode(PROMPT * 6).ids[-40:])
    model.predict(np.array([ids[-40:]], dtype=np.int32), verbose=0)  # build the predict function
    t = time.perf_counter()
    for _ in range(chars):
        logits = model.predict(np.array([ids[-40:]], dtype=np.int32), verbose=0)[:, -1, :]  # (1, V)
        ids.append(int(next_ids(logits, [settings], [rng])[0]))
    return chars / (time.perf_counter() - t)


class OneStep:
    """The TensorFlow tutorial's OneStep: a model that takes and returns its recurrent states, called
    once per character inside a tf.function that samples with tf.random.categorical."""

    def __init__(self, model, config, batch: int):
        import keras
        import tensorflow as tf

        from model.training.network import cell_layer

        ids = keras.Input(batch_shape=(batch, None), dtype="int32")
        per_layer = 2 if config.cell == "lstm" else 1
        states_in = [keras.Input(batch_shape=(batch, config.units)) for _ in range(config.layers * per_layer)]
        x = keras.layers.Embedding(model.get_layer("embedding").input_dim, config.embedding, name="embedding")(ids)
        states_out = []
        for i in range(config.layers):
            layer = cell_layer(config.cell)(config.units, return_sequences=True, return_state=True, name=f"rnn_{i + 1}")
            x, *s = layer(x, initial_state=states_in[i * per_layer : (i + 1) * per_layer])
            states_out += s
        logits = keras.layers.Dense(model.get_layer("logits").units, name="logits")(x)
        self.model = keras.Model([ids, *states_in], [logits, *states_out])
        for layer in self.model.layers:
            if layer.weights:
                layer.set_weights(model.get_layer(layer.name).get_weights())
        self.zero = [tf.zeros((batch, config.units)) for _ in states_in]
        self.batch = batch

        @tf.function
        def generate_one_step(inputs, states):
            logits, *states = self.model([inputs, *states])
            logits = logits[:, -1, :] / TEMPERATURE
            predicted = tf.random.categorical(logits, num_samples=1, dtype=tf.int32)  # (batch, 1)
            return predicted, states

        self.generate_one_step = generate_one_step

    def run(self, prompt_ids, chars: int) -> tuple[float, float]:
        """(characters per second over all streams, seconds to the first character)."""
        import tensorflow as tf

        inputs = tf.constant(np.tile(prompt_ids, (self.batch, 1)), dtype=tf.int32)
        t = time.perf_counter()
        next_char, states = self.generate_one_step(inputs, self.zero)
        first = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(chars):
            next_char, states = self.generate_one_step(next_char, states)
        next_char.numpy()
        return self.batch * chars / (time.perf_counter() - t), first


# ---------------------------------------------------------------- main


def session_study(graph: Path, names, layers, units, prompt_ids, seconds: float, rounds: int) -> None:
    """The bare loop under other session settings (threads, spinning), taking turns; at 48 and 64
    streams too."""
    import onnxruntime as ort

    def make(threads: int, spin: str):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    settings = {f"{t} thread{'s' if t > 1 else ''}, {'spinning' if spin == '1' else 'no spinning'}": make(t, spin)
                for t in (1, 2) for spin in ("0", "1")}
    sizes = sorted({*STREAMS, 48, 64})
    loops = {(name, b): BareLoop(sess, names, layers, units, prompt_ids, b) for name, sess in settings.items() for b in sizes}
    rates: dict = {}
    for _ in range(rounds):
        for b in sizes:
            pair = {name: loops[name, b] for name in settings}
            for name, rate in side_by_side(pair, b, len(settings) * seconds / rounds).items():
                rates.setdefault((name, b), []).append(rate)
    print(f"\n  bare ONNX Runtime loop by session setting (chars/s, median of {rounds} rounds)")
    print(f"  {'setting':30s}" + "".join(f"{b:>10}" for b in sizes))
    for name in settings:
        print(f"  {name:30s}" + "".join(f"{statistics.median(rates[name, b]):>10,.0f}" for b in sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"), help="artifact directory (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=6.0, help="per stream count, for f and for the engine, over all rounds (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds of f and the engine (default: %(default)s)")
    parser.add_argument("--naive-chars", type=int, default=40, help="characters for (a) (default: %(default)s)")
    parser.add_argument("--onestep-chars", type=int, default=400, help="characters per stream for (b) and (e) (default: %(default)s)")
    parser.add_argument("--precision", default="float32,int8", help="the graphs to run, comma separated (default: %(default)s)")
    parser.add_argument("--no-openvino", action="store_true", help="leave out OpenVINO's rows (o)")
    parser.add_argument("--sessions", action="store_true", help="also run the bare loop under other session settings")
    args = parser.parse_args()
    asked = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not asked or any(p not in ("float32", "int8") for p in asked):
        parser.error(f"--precision: float32 and/or int8, comma separated; got {args.precision!r}")

    import onnxruntime as ort

    from model.runtime import artifact
    from model.training import artifacts
    from model.runtime.engine import Engine
    from model.runtime.onnx_step import make_session, providers

    try:
        path, meta, vocab = artifact.check(args.artifact, keras=True)  # model.onnx may be missing: built below
    except artifact.ArtifactError as e:
        sys.exit(f"error: {e}")
    graph, note = graph_path(path)
    arts = {"float32": artifacts.Artifact(path, None, vocab, meta, graph)} if "float32" in asked else {}
    if "int8" in asked:
        try:
            arts["int8"] = artifact.load(path, "int8")
        except artifact.ArtifactError as e:
            print(f"int8       left out: {e}")
    if not arts:
        sys.exit("error: no graph to run")
    precisions = list(arts)
    config = meta.config
    engines = {p: Engine(a, max_batch=max(STREAMS)) for p, a in arts.items()}
    cores = len(os.sched_getaffinity(0))
    print(f"artifact   {path}: {config.layers}x{config.units} {config.cell}, embedding {config.embedding}, vocabulary {len(vocab)}{note}")
    print(f"machine    {platform.processor() or platform.machine()}, {cores} cores, load average {os.getloadavg()[0]:.2f}; "
          f"numpy {np.__version__}; onnxruntime {ort.__version__}")
    first = engines[precisions[0]]
    flops = first.network.flops_per_char()
    peak = attainable_gflops()
    print(f"float32    large matrix product: {peak:.1f} GFLOP/s; the network needs {flops / 1e6:.3f} MFLOP per character")
    print("graphs     " + "; ".join(f"{p}: {a.graph.name} ({a.graph.stat().st_size / 1e6:.1f} MB), the engine's threshold for "
                                    f"a second thread {engines[p].network.min_rows_per_thread} rows" for p, a in arts.items()))

    # f and the engine of each graph, round-robin
    names = ["h", "c"] if config.cell == "lstm" else ["h"]
    prompt_ids = vocab.encode(PROMPT).ids

    def threads_for(p: str, b: int) -> int:
        return 1 if b < engines[p].network.min_rows_per_thread else cores

    sessions = {(p, t): make_session(str(a.graph), t, providers("cpu")) for p, a in arts.items() for t in {1, cores}}
    loops = {(p, b): BareLoop(sessions[p, threads_for(p, b)], names, config.layers, config.units, prompt_ids, b)
             for p in precisions for b in STREAMS}
    # g's own sessions: a loop that ran on f's would find f's weights in the cache after f's turn (the engine's are its own too)
    own = {(p, t): make_session(str(a.graph), t, providers("cpu")) for p, a in arts.items() for t in {1, cores}}
    bound = {(p, b): BoundLoop(own[p, threads_for(p, b)], names, config.layers, config.units, prompt_ids, b)
             for p in precisions for b in STREAMS}
    rates: dict = {}
    for _ in range(args.rounds):
        for b in STREAMS:
            engine_loops = {p: EngineLoop(engines[p], b) for p in precisions}
            group = {}
            for p in precisions:
                group[("f", p)], group[("g", p)], group[("engine", p)] = loops[p, b], bound[p, b], engine_loops[p]
            for loop in group.values():
                loop.run(3)  # warm up
            # each loop runs about seconds / 2 in all, as when the group was f and the engine alone
            for key, rate in side_by_side(group, b, len(group) / 2 * args.seconds / args.rounds).items():
                rates.setdefault((*key, b), []).append(rate)
            for loop in engine_loops.values():
                loop.close()
    median = {key: statistics.median(values) for key, values in rates.items()}

    def ratio(top: tuple, bottom: tuple) -> list[float]:
        return [x / y for x, y in zip(rates[top], rates[bottom])]

    # (o) OpenVINO against f, graph by graph
    openvino: dict = {}
    if args.no_openvino:
        print("openvino   left out (--no-openvino)")
    else:
        compiled = {p: openvino_compiled(a.graph, {1, cores}) for p, a in arts.items()}
        if not any(compiled.values()):
            print("openvino   not installed: its rows (o) are left out (pip install -e '.[bench]')")
        else:
            import openvino as ov

            print(f"openvino   {ov.__version__}")
            for _ in range(args.rounds):
                for b in STREAMS:
                    for p in precisions:
                        pair = {"f": loops[p, b], "o": BareLoop(OpenVinoSession(compiled[p][threads_for(p, b)]), names,
                                                                config.layers, config.units, prompt_ids, b)}
                        pair["o"].run(3)
                        for kind, rate in side_by_side(pair, b, 2 * args.seconds / args.rounds).items():
                            openvino.setdefault((kind, p, b), []).append(rate)

    prompts = {p: {n: prompt_ms(e, text_of(vocab, n), 15 if n == 200 else 5) for n in (200, 4000)} for p, e in engines.items()}
    per_stream = memory_per_stream(first)
    slot = first.network.bytes_per_slot()
    rss = {p: serving_rss(path, p, max(STREAMS)) for p in precisions}

    # the Keras peers
    import keras
    import tensorflow as tf

    model = artifacts.load_keras(path).model
    a = naive(model, vocab, args.naive_chars)
    one = OneStep(model, config, batch=1)
    one.run(prompt_ids, 5)  # trace
    b1 = max(one.run(prompt_ids, args.onestep_chars)[0] for _ in range(REPEATS))
    one32 = OneStep(model, config, batch=32)
    one32.run(prompt_ids, 5)
    e = max(one32.run(prompt_ids, args.onestep_chars // 2)[0] for _ in range(REPEATS))
    prompt200 = vocab.encode(text_of(vocab, 200)).ids
    one.run(prompt200, 1)  # traces for this prompt length
    b_first200 = statistics.median(one.run(prompt200, 1)[1] for _ in range(3)) * 1e3

    def row(name, rate, share=True, extra=""):
        shown = f"{rate * flops / (peak * 1e9):7.1%}" if share else " " * 7
        print(f"  {name:52s} {rate:12,.0f}   {shown}   {extra}")

    def streams(n: int) -> str:
        return f"{n} stream{'s' if n > 1 else ''}"

    print(f"\n  (TensorFlow {tf.__version__}, Keras {keras.__version__}; f and the engine: median of {args.rounds} interleaved rounds, "
          f"{args.seconds / args.rounds:g} s each per graph)")
    print(f"  {'method (temperature 0.8)':52s} {'chars/s':>12s}   {'of float32 rate':>7s}   engine / f   engine / g")
    row("a  naive: predict on last 40 chars", a, False)
    row("b  OneStep tf.function, 1 stream", b1, False)
    row("e  OneStep tf.function, 32 streams (total)", e, False)
    for n in STREAMS:
        for p in precisions:
            row(f"f  bare ONNX Runtime loop, {p}, {streams(n)}", median["f", p, n])
            row(f"g  lightest loop (IO binding), {p}, {streams(n)}", median["g", p, n])
            r, q = ratio(("engine", p, n), ("f", p, n)), ratio(("engine", p, n), ("g", p, n))
            row(f"{'c' if n == 1 else 'd'}  engine, {p}, {streams(n)}", median["engine", p, n],
                extra=f"{statistics.median(r):.0%} ({min(r):.0%}-{max(r):.0%})   {statistics.median(q):.0%} ({min(q):.0%}-{max(q):.0%})")
    if openvino:
        print(f"\n  {'OpenVINO against f, the same graph (taking turns)':52s} {'chars/s':>12s}   {'':>7s}   o / f")
        for n in STREAMS:
            for p in precisions:
                r = [o / f for o, f in zip(openvino["o", p, n], openvino["f", p, n])]
                row(f"o  bare OpenVINO loop, {p}, {streams(n)}", statistics.median(openvino["o", p, n]),
                    extra=f"{statistics.median(r):.0%} ({min(r):.0%}-{max(r):.0%})")

    goals = []
    for p in precisions:
        for n in STREAMS:
            r = statistics.median(ratio(("engine", p, n), ("f", p, n)))
            goals.append((f"{p} engine >= 95% of f at {streams(n)}: {r:.1%}", r >= 0.95))
    if len(precisions) == 2:
        for n, goal in ((1, 3.0), (8, None), (32, 1.8), (128, 1.3)):
            r = statistics.median(ratio(("engine", "int8", n), ("engine", "float32", n)))
            if goal is None:
                print(f"  int8 / float32 engine at {streams(n)}: {r:.2f}")
            else:
                goals.append((f"int8 / float32 engine at {streams(n)}: {r:.2f} (>= {goal:g})", r >= goal))
        faster = prompts["float32"][4000][0] / prompts["int8"][4000][0]
        goals.append((f"4,000-character prompt: int8 {prompts['int8'][4000][0]:.1f} ms, float32 {prompts['float32'][4000][0]:.1f} ms: "
                      f"{faster:.1f}x faster (>= 2.5x)", faster >= 2.5))
    for p in precisions:
        c = median["engine", p, 1]
        goals += [
            (f"{p}: c / a = {c / a:.1f} (engine, 1 stream / naive predict; >= 3)", c / a >= 3),
            (f"{p}: c / b = {c / b1:.1f} (engine, 1 stream / OneStep; >= 3)", c / b1 >= 3),
            (f"{p}: d32 / e = {median['engine', p, 32] / e:.1f} (engine / OneStep, 32 streams; >= 2, issue 4's goal)",
             median["engine", p, 32] / e >= 2),
            (f"{p}: 4,000-character prompt consumed in {prompts[p][4000][0]:.1f} ms: {OLD_PROMPT_MS / prompts[p][4000][0]:.1f}x "
             f"faster than {OLD_PROMPT_MS:.0f} ms (>= 3x)", OLD_PROMPT_MS / prompts[p][4000][0] >= 3),
            (f"{p}: resident memory of a process with the engine loaded and 500 characters generated, no Keras: "
             f"{rss[p][0]:.0f} MB (peak {rss[p][1]:.0f} MB; <= 200 MB)", rss[p][0] <= 200),
        ]
    for n in STREAMS:
        for p in precisions:
            if openvino:
                r = statistics.median([o / f for o, f in zip(openvino["o", p, n], openvino["f", p, n])])
                if r > 1.2:
                    print(f"  OpenVINO is more than 20% faster than ONNX Runtime: {p}, {streams(n)}: {r:.0%} of f")
    print()
    for text, met in goals:
        print(f"  [{'met' if met else 'NOT MET'}] {text}")
    for p in precisions:
        print(f"  {p} prompt: 200 characters consumed in {prompts[p][200][0]:.1f} ms, first character after it at "
              f"{prompts[p][200][1]:.1f} ms (OneStep {b_first200:.1f} ms); 4,000 characters: {prompts[p][4000][0]:.1f} ms "
              f"and {prompts[p][4000][1]:.1f} ms")
    print(f"  memory per added stream ({precisions[0]}): {per_stream / 1024:.1f} KiB of Python objects and arrays, plus "
          f"{slot / 1024:.1f} KiB of state and staging per batch slot, allocated up front ({first.max_batch} slots: "
          f"{slot * first.max_batch / 2**20:.1f} MiB)")

    if args.sessions:
        for p, a in arts.items():
            print(f"\n  {p}:", end="")
            session_study(a.graph, names, config.layers, config.units, prompt_ids, args.seconds, args.rounds)


if __name__ == "__main__":
    main()
