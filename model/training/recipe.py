"""The training recipe: regularisation and optimisation that change how a network is trained, never
what it is. The served network is the same whatever the recipe: dropout of every kind is off at
inference, weight drop masks a copy of a kernel (the trained kernel is what is saved), and the
averaged weights are weights of the same shape. So an artifact (model.keras, model.onnx) has the
format it always had, and the engine serves it as it is.

What each setting does (the literature on character-level recurrent models: AWD-LSTM, Merity et
al. 2017; variational dropout, Gal & Ghahramani 2016; Polyak averaging):
  - locked dropout: one dropout mask per window, shared by all its time steps (variational), on
    the embedding's output (--input-dropout), between layers (--dropout) and on the last layer's
    output (--output-dropout); with --no-locked each step draws its own mask, as char-rnn does.
  - --embedding-dropout: a position's whole character embedding is zeroed (the character is
    hidden from the network at that position), the rest scaled up.
  - --weight-drop: DropConnect on each layer's recurrent kernel, one mask per batch, so the
    recurrence itself is regularised without a mask on the state at every step.
  - --weight-decay: AdamW's decoupled decay, biases excluded.
  - --schedule: the learning rate after --warmup steps of linear warm-up: exponential (times
    --lr-decay per epoch), cosine or linear decay to --min-lr times --lr at the run's last step,
    or constant. The decay's length is fixed when the run starts (its --epochs / --max-steps); a
    resumed run with more steps stays at the floor after it.
  - --ema: an exponential moving average of the weights, its decay per step ramping up to D as
    (1 + step) / (10 + step) (TensorFlow's ExponentialMovingAverage with num_updates). Each
    evaluation scores the average and the raw weights, and the better of the two is the
    evaluation's: the validation loss, early stopping and the artifact saved (an average lags the
    weights while the learning rate is high, and is ahead once it decays); training goes on from
    the raw weights.

Everything Keras is built on first use, so importing this module does not import Keras.
"""

from __future__ import annotations

import functools
import math

from model.records.config import Recipe


def custom_objects() -> dict:
    """The recipe's Keras classes, registered: loading a checkpoint of a run that used them needs
    this called first (the artifact's model.keras never contains them)."""
    return dict(_classes())


@functools.cache
def _classes() -> dict:
    """The recipe's Keras classes by name, made (and registered) once, on first use: defining them
    needs Keras, which importing this module does not import."""
    import keras

    made = [_warmup_decay(), _averaged(keras.optimizers.Adam), _averaged(keras.optimizers.AdamW)]
    made += [_weight_dropped(base) for base in (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)]
    return {cls.__name__: cls for cls in made}


def _register(cls: type) -> type:
    import keras

    return keras.saving.register_keras_serializable(package="chargen")(cls)


def _weight_dropped(base: type) -> type:
    import keras

    class WeightDropped(base):
        """`base` (LSTM, GRU, SimpleRNN) with DropConnect on its recurrent kernel while training."""

        def __init__(self, *args, weight_drop: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.weight_drop = weight_drop
            self.weight_seed = keras.random.SeedGenerator(kwargs.get("seed"))

        def inner_loop(self, sequences, initial_state, mask, training=False):
            if not (training and self.weight_drop):
                return super().inner_loop(sequences, initial_state, mask, training=training)
            kernel = self.cell.recurrent_kernel
            dropped = keras.random.dropout(kernel.value, self.weight_drop, seed=self.weight_seed)
            # every step of the loop reads the cell's attribute: point it at the masked copy for
            # this call (object.__setattr__: Keras would track the tensor as a new weight)
            object.__setattr__(self.cell, "recurrent_kernel", dropped)
            try:
                return super().inner_loop(sequences, initial_state, mask, training=training)
            finally:
                object.__setattr__(self.cell, "recurrent_kernel", kernel)

        def get_config(self):
            return {**super().get_config(), "weight_drop": self.weight_drop}

    WeightDropped.__name__ = WeightDropped.__qualname__ = f"WeightDropped{base.__name__}"
    return _register(WeightDropped)


def _averaged(base: type) -> type:
    from keras import ops

    class Averaged(base):
        """`base` whose moving average of the weights (use_ema) stays in the optimizer: fit()
        would copy it into the weights when it returns, and a run calls fit() once per
        evaluation. Biases are excluded from weight decay."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.weight_decay:
                self.exclude_from_weight_decay(var_names=["bias"])

        def finalize_variable_values(self, var_list):
            pass

        def _update_model_variables_moving_average(self, trainable_variables):
            # TensorFlow's ExponentialMovingAverage(num_updates=step): the decay ramps up to
            # ema_momentum as (1 + t) / (10 + t), so the average forgets the initial weights
            # (Keras' own keeps 0.999 of them at the first steps) and in a run of a few
            # thousand steps averages the last few hundred; the first step copies the weights
            if not self.use_ema:
                return
            t = ops.cast(self.iterations, "float32")
            ramp = ops.where(ops.equal(t, 0.0), 0.0, (1.0 + t) / (10.0 + t))
            momentum = ops.minimum(ramp, self.ema_momentum)
            for var, average in zip(trainable_variables, self._model_variables_moving_average):
                if average is not None:
                    m = ops.cast(momentum, var.dtype)
                    average.assign(m * average + (1.0 - m) * var)

    Averaged.__name__ = Averaged.__qualname__ = f"Averaged{base.__name__}"
    return _register(Averaged)


def _warmup_decay() -> type:
    import keras
    from keras import ops

    class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warm-up over `warmup` steps to `lr`, then the decay `shape` (see the module)."""

        def __init__(self, lr, warmup, shape, decay_steps, floor, per_epoch=1, rate=1.0):
            self.lr, self.warmup, self.shape = float(lr), int(warmup), shape
            self.decay_steps, self.floor = max(1, int(decay_steps)), float(floor)
            self.per_epoch, self.rate = max(1, int(per_epoch)), float(rate)

        def __call__(self, step):
            step = ops.cast(step, "float32")
            after = ops.maximum(step - self.warmup, 0.0)
            if self.shape == "exponential":
                decayed = self.lr * ops.power(self.rate, after / self.per_epoch)
            elif self.shape == "constant":
                decayed = self.lr + 0.0 * after
            else:
                progress = ops.minimum(after / max(1, self.decay_steps - self.warmup), 1.0)
                fraction = 0.5 * (1.0 + ops.cos(math.pi * progress)) if self.shape == "cosine" else 1.0 - progress
                decayed = self.floor * self.lr + (1.0 - self.floor) * self.lr * fraction
            if not self.warmup:
                return decayed
            return ops.where(step < self.warmup, self.lr * (step + 1.0) / self.warmup, decayed)

        def get_config(self):
            return {"lr": self.lr, "warmup": self.warmup, "shape": self.shape, "decay_steps": self.decay_steps,
                    "floor": self.floor, "per_epoch": self.per_epoch, "rate": self.rate}

    return _register(WarmupDecay)


def recurrent_layer(cell_class: type, recipe: Recipe) -> type:
    """The layer class a training network uses for `cell_class` (the plain one without weight drop)."""
    return _classes()[f"WeightDropped{cell_class.__name__}"] if recipe.weight_drop else cell_class


def optimizer(recipe: Recipe, *, lr: float, lr_decay: float, clipnorm: float, steps_per_epoch: int, last_step: int):
    """The run's optimizer with its learning-rate schedule. Today's recipe (exponential decay, no
    warm-up, Adam) builds exactly the optimizer runs always had, so their checkpoints stay alike."""
    import keras

    clip = clipnorm or None
    if recipe.schedule == "exponential" and not recipe.warmup:
        schedule = keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=steps_per_epoch, decay_rate=lr_decay)
    else:
        schedule = _classes()["WarmupDecay"](lr, recipe.warmup, recipe.schedule, last_step, recipe.min_lr,
                                             per_epoch=steps_per_epoch, rate=lr_decay)
    if recipe.plain_optimizer:
        return keras.optimizers.Adam(learning_rate=schedule, global_clipnorm=clip)
    averaging = {"use_ema": True, "ema_momentum": recipe.ema} if recipe.ema else {}
    if recipe.weight_decay:
        return _classes()["AveragedAdamW"](learning_rate=schedule, weight_decay=recipe.weight_decay,
                                           global_clipnorm=clip, **averaging)
    return _classes()["AveragedAdam"](learning_rate=schedule, global_clipnorm=clip, **averaging)


def averaged_weights(model) -> list | None:
    """The moving average of the model's trainable weights (numpy, in their order), or None when
    its optimizer keeps none: also before its first step (a fresh run's first network call, timed
    for --max-minutes), when there is no average yet and the weights are what it will start from."""
    import keras

    opt = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # a loss-scaling wrapper's
    if not getattr(opt, "use_ema", False) or not opt.built:
        return None
    averages = opt._model_variables_moving_average  # Keras keeps them there (no public accessor)
    return [keras.ops.convert_to_numpy(v) for v in averages]


# `chargen train --preset NAME`: starting points, by the command line's option names. An option
# given on the command line overrides its preset value. (bench/README.md and the README's table
# give what each reached, and in how long.)
