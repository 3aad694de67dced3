"""Generation speed, side by side in one run: naive windowed predict, TensorFlow's stateful OneStep,
and the engine, single and batched. Prints one table; see bench/README.md.

    .venv/bin/python bench/generation.py [--artifact artifacts/default]

  a  naive: model.predict on the last 40 characters, once per character (keras.io / textgenrnn)
  b  OneStep: a stateful one-step tf.function carrying the states (the TensorFlow text generation
     tutorial), one stream
  c  the engine, one stream
  d  the engine, 8, 32 and 128 streams stepped together (total characters per second)
  e  OneStep with a batch of 32 streams (total characters per second)

(a), (b) and (e) run for a fixed small number of characters; every rate but (a)'s is the best of
three runs, so the whole run takes about a minute. Every method samples at temperature 0.8. The share of the machine's float32 rate counts the
matrix-product FLOPs per character from the network's shapes and divides by the rate of a large
float32 matrix product measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

os.environ["KERAS_BACKEND"] = "tensorflow"  # OneStep is TensorFlow's; the engine does not care
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

TEMPERATURE = 0.8
PROMPT = "ROMEO:\n"
REPEATS = 3  # every rate is the best of this many runs, for OneStep and the engine alike


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


# ---------------------------------------------------------------- (a) naive windowed predict


def naive(model, vocab, chars: int) -> float:
    from model.sampling import SamplingSettings, next_ids

    settings, rng = SamplingSettings(TEMPERATURE), np.random.default_rng(0)
    ids = list(vocab.encode(PROMPT * 6).ids[-40:])
    model.predict(np.array([ids[-40:]], dtype=np.int32), verbose=0)  # build the predict function
    t = time.perf_counter()
    for _ in range(chars):
        logits = model.predict(np.array([ids[-40:]], dtype=np.int32), verbose=0)[:, -1, :]  # (1, V)
        ids.append(int(next_ids(logits, [settings], [rng])[0]))
    return chars / (time.perf_counter() - t)


# ---------------------------------------------------------------- (b), (e) OneStep


class OneStep:
    """The TensorFlow tutorial's OneStep: a model that takes and returns its recurrent states, called
    once per character inside a tf.function that samples with tf.random.categorical."""

    def __init__(self, model, config, batch: int):
        import keras
        import tensorflow as tf

        from model.network import cell_layer

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


# ---------------------------------------------------------------- (c), (d) the engine


def engine_rate(engine, streams: int, steps: int, repeats: int = REPEATS) -> float:
    """Characters per second over all streams: the best of `repeats` runs of `steps` steps."""
    from model.engine import GenerationRequest
    from model.sampling import SamplingSettings

    batch = [
        engine.start(GenerationRequest(PROMPT, max_chars=10**9, sampling=SamplingSettings(TEMPERATURE), seed=i))
        for i in range(streams)
    ]
    engine.step(batch)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            engine.step(batch)
        best = max(best, streams * steps / (time.perf_counter() - t))
    for s in batch:
        engine.cancel(s)
    return best


def engine_first_char(engine, prompt: str, repeats: int = 15) -> float:
    from model.engine import GenerationRequest
    from model.sampling import SamplingSettings

    times = []
    for seed in range(repeats):
        t = time.perf_counter()
        s = engine.start(GenerationRequest(prompt, max_chars=10, sampling=SamplingSettings(TEMPERATURE), seed=seed))
        engine.step([s])
        times.append(time.perf_counter() - t)
        engine.cancel(s)
    return statistics.median(times)


def memory_per_stream(engine, streams: int = 64) -> float:
    """Bytes of Python objects and arrays allocated per started stream (slot buffers are allocated
    by the engine up front and counted separately)."""
    from model.engine import GenerationRequest
    from model.sampling import SamplingSettings

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    batch = [engine.start(GenerationRequest(PROMPT, max_chars=10**9, sampling=SamplingSettings(TEMPERATURE), seed=i)) for i in range(streams)]
    for _ in range(20):
        engine.step(batch)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    for s in batch:
        engine.cancel(s)
    return used / streams


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", default="artifacts/default", help="artifact directory (default: %(default)s)")
    parser.add_argument("--naive-chars", type=int, default=40, help="characters for (a) (default: %(default)s)")
    parser.add_argument("--onestep-chars", type=int, default=400, help="characters per stream for (b) and (e) (default: %(default)s)")
    parser.add_argument("--engine-chars", type=int, default=3000, help="characters for (c); (d) steps scale down from it (default: %(default)s)")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from model import artifact as artifacts
    from model.engine import Engine

    try:
        art = artifacts.load(args.artifact)
    except artifacts.ArtifactError as e:
        sys.exit(f"error: {e}")
    config, vocab = art.config, art.vocab
    engine = Engine(art, max_batch=128)
    flops = engine.network.flops_per_char()
    blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
    print(f"artifact   {art.path}: {config.layers}x{config.units} {config.cell}, embedding {config.embedding}, vocabulary {len(vocab)}")
    print(f"machine    {platform.processor() or platform.machine()}, {os.cpu_count()} cores; numpy {np.__version__} with "
          f"{blas['name']} {blas.get('version', '')}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}")

    peak = attainable_gflops()
    print(f"float32    large matrix product: {peak:.1f} GFLOP/s; the network needs {flops / 1e6:.3f} MFLOP per character "
          "(its matrix products; the first layer's input projection is a table lookup)")

    prompt_ids = vocab.encode(PROMPT).ids
    a = naive(art.model, vocab, args.naive_chars)
    one = OneStep(art.model, config, batch=1)
    one.run(prompt_ids, 5)  # trace
    b = max(one.run(prompt_ids, args.onestep_chars)[0] for _ in range(REPEATS))
    one32 = OneStep(art.model, config, batch=32)
    one32.run(prompt_ids, 5)
    e = max(one32.run(prompt_ids, args.onestep_chars // 2)[0] for _ in range(REPEATS))

    c = engine_rate(engine, 1, args.engine_chars)
    d = {n: engine_rate(engine, n, max(50, args.engine_chars // n * 4)) for n in (8, 32, 128)}
    prompt200 = (vocab.decode(vocab.encode(Path(__file__).read_text()).ids) * 2)[:200]
    first = engine_first_char(engine, prompt200)
    one.run(vocab.encode(prompt200).ids, 1)  # traces for this prompt length
    b_first200 = statistics.median(one.run(vocab.encode(prompt200).ids, 1)[1] for _ in range(3))
    slot = engine.network.bytes_per_slot()
    per_stream = memory_per_stream(engine)

    def row(name, rate, share=True):
        extra = f"{rate * flops / (peak * 1e9):7.1%}" if share else ""
        print(f"  {name:44s} {rate:12,.0f}   {extra}")

    print()
    print(f"  {'method (temperature 0.8)':44s} {'chars/s':>12s}   {'of float32 rate':>7s}")
    row("a  naive: predict on last 40 chars", a, False)
    row("b  OneStep tf.function, 1 stream", b, False)
    row("c  engine, 1 stream", c)
    for n, rate in d.items():
        row(f"d  engine, {n} streams (total)", rate)
    row("e  OneStep tf.function, 32 streams (total)", e, False)
    print()
    print(f"  c/a   = {c / a:8.1f}   (goal >= 150)")
    print(f"  c/b   = {c / b:8.1f}   (goal >= 3)")
    print(f"  d32/e = {d[32] / e:8.1f}   (goal >= 2)")
    print(f"  d128  = {d[128] * flops / (peak * 1e9):8.1%} of the float32 rate (goal >= 60%)")
    print(f"  first character after a 200-character prompt: engine {first * 1e3:.1f} ms (OneStep {b_first200 * 1e3:.1f} ms)")
    print(f"  memory per added stream: {per_stream / 1024:.1f} KiB of Python objects and arrays, plus {slot / 1024:.1f} KiB "
          f"of state and scratch per batch slot, allocated up front ({engine.max_batch} slots: {slot * engine.max_batch / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
