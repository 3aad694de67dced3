"""Dynamic evaluation (Krause et al. 2018, "Dynamic Evaluation of Neural Sequence Models"): score a
text while a copy of the network adapts to it.

The text runs through the network as one stream, cut into segments of `segment` characters. Each
segment is first scored with the weights as they are (every character is predicted from what came
before it only), then one gradient step on that segment's loss moves the weights, with a decay
that pulls them back toward the trained weights: the paper's RMS-normalised update

    θ ← θ − lr · ∇L(segment) / (RMS(∇) + ε) + decay · (θ_trained − θ)

The recurrent state is carried from each segment into the next, as in the paper. With lr 0 the
weights never move, and this is the trained network's score on one stream with the state carried
from the first character to the last (StreamScorer with one stream).

One difference: the paper measures each weight's root mean square gradient RMS(∇) once, on the
training text; an artifact does not carry its training text, so RMS(∇) is a running average over
the segments of this text already scored (Adam's bias-corrected second moment), which uses no
character before it is predicted. The paper also scales the decay per weight by RMS(∇); here it is
one number.

The copy is built from the network's layers (new layers, the same weights, dropout off) with the
recurrent state as explicit inputs and outputs: Keras's stateful layers do not carry their state
through JAX's stateless calls. The network given, and the artifact it came from, are never
changed. Keras 3 only: the gradient comes from `train_on_batch` and the step is a Keras optimizer
written in keras.ops, so it runs on TensorFlow and on JAX alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the command line reads DynamicSettings before any heavy import
    import keras
    import numpy as np

    from model.training.evaluate import Loss


@dataclass(frozen=True)
class DynamicSettings:
    segment: int = 50  # characters scored between two weight updates
    lr: float = 3e-4  # size of each RMS-normalised gradient step
    decay: float = 1e-3  # share of the way back to the trained weights taken at each update

    def __post_init__(self):
        if isinstance(self.segment, bool) or not isinstance(self.segment, int) or self.segment < 1:
            raise ValueError(f"segment must be a positive whole number, got {self.segment!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a number at least 0, got {self.lr!r}")
        if not (isinstance(self.decay, (int, float)) and 0.0 <= self.decay <= 1.0):
            raise ValueError(f"decay must be in [0, 1], got {self.decay!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# How slowly the mean square of the gradients forgets: an average over about the last 1,000 segments.
RMS_MEMORY = 0.999


def _optimizer(settings: DynamicSettings):
    """The paper's RMS-normalised step as a Keras optimizer: each weight's gradient divided by the
    root mean square of that weight's gradients so far (bias-corrected, as Adam's second moment),
    then decay toward the weights the optimizer was built with (the trained ones)."""
    import keras

    class DynamicStep(keras.optimizers.Optimizer):
        def __init__(self, lr: float, decay: float):
            super().__init__(learning_rate=lr, name="dynamic_evaluation")
            self.decay = decay

        def build(self, variables):
            """Called eagerly, before the first step (see dynamic_loss): it copies the weights."""
            if self.built:
                return
            super().build(variables)
            self._trained = [self.add_variable_from_reference(v, "trained") for v in variables]
            self._mean_square = [self.add_variable_from_reference(v, "mean_square") for v in variables]
            for trained, v in zip(self._trained, variables):
                trained.assign(keras.ops.copy(v))  # its own buffer: JAX donates each variable's

        def update_step(self, gradient, variable, learning_rate):
            ops = keras.ops
            index = self._get_variable_index(variable)
            trained, mean_square = self._trained[index], self._mean_square[index]
            # dense: TensorFlow gives the embedding's gradient as slices, one per use of a character,
            # whose squares would be summed before the slices are
            gradient = ops.add(ops.zeros(variable.shape, variable.dtype), gradient)
            self.assign(mean_square, ops.add(ops.multiply(RMS_MEMORY, mean_square),
                                             ops.multiply(1.0 - RMS_MEMORY, ops.square(gradient))))
            steps = ops.cast(self.iterations + 1, variable.dtype)
            rms = ops.sqrt(ops.divide(mean_square, ops.subtract(1.0, ops.power(RMS_MEMORY, steps))))
            step = ops.multiply(ops.cast(learning_rate, variable.dtype), ops.divide(gradient, ops.add(rms, 1e-8)))
            pull = ops.multiply(self.decay, ops.subtract(trained, variable))  # from the weights before the step
            self.assign(variable, ops.add(ops.subtract(variable, step), pull))

    return DynamicStep(settings.lr, settings.decay)


def _state_sizes(layer) -> list[int]:
    size = layer.cell.state_size
    return list(size) if isinstance(size, (list, tuple)) else [size]


def adaptable_copy(model: keras.Model) -> tuple[keras.Model, keras.Model, list[int]]:
    """Two views of one copy of the network (a chain: embedding, recurrent layers, logits), which
    share their layers: `step` maps (chars, *states) to (logits, *final states), `fit` maps
    (chars, *states) to logits, for `train_on_batch`. Returns them and the size of each state."""
    import keras

    chars = keras.Input(batch_shape=(1, None), dtype="int32", name="chars")
    x, state_inputs, final_states, sizes = chars, [], [], []
    for layer in model.layers:
        if isinstance(layer, (keras.layers.InputLayer, keras.layers.Dropout)):
            continue  # dropout is off in evaluation
        config = layer.get_config()
        if isinstance(layer, keras.layers.RNN):
            config.update(return_state=True, stateful=False, dropout=0.0, recurrent_dropout=0.0)
            copy = type(layer).from_config(config)
            inputs = [keras.Input(batch_shape=(1, n), name=f"{layer.name}_state_{i}")
                      for i, n in enumerate(_state_sizes(layer))]
            x, *states = copy(x, initial_state=inputs)  # (1, T, H), then (1, H) each
            state_inputs += inputs
            final_states += states
            sizes += _state_sizes(layer)
        else:
            copy = type(layer).from_config(config)
            x = copy(x)
        copy.set_weights(layer.get_weights())
    step = keras.Model([chars, *state_inputs], [x, *final_states], name="dynamic_step")
    fit = keras.Model([chars, *state_inputs], x, name="dynamic_fit")
    return step, fit, sizes


def dynamic_loss(model: keras.Model, ids: np.ndarray, settings: DynamicSettings = DynamicSettings()) -> Loss:
    """The loss on `ids` (every character but the first predicted) under dynamic evaluation."""
    import keras
    import numpy as np

    from model.training.evaluate import Loss, nats_of

    if len(ids) < 2:
        raise ValueError("need at least two characters to score")
    step, fit, sizes = adaptable_copy(model)
    optimizer = _optimizer(settings)
    fit.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    optimizer.build(fit.trainable_variables)  # now: built inside TensorFlow's traced step, the copy would not be made
    ids = np.asarray(ids, dtype=np.int32)
    states = [np.zeros((1, n), np.float32) for n in sizes]
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, settings.segment):
        y = ids[start + 1 : start + 1 + settings.segment][None, :]  # (1, n)
        x = ids[start : start + y.shape[1]][None, :]
        logits, *after = step.predict_on_batch([x, *states])  # scored before this segment's step
        total += nats_of(keras.ops.convert_to_numpy(logits), y)
        count += y.size
        if settings.lr or settings.decay:
            fit.train_on_batch([x, *states], y)
        states = [keras.ops.convert_to_numpy(s) for s in after]
    return Loss(total / count, count)
