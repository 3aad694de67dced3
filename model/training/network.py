"""The network: character ids -> embedding -> stacked recurrent layers -> next-character logits.

Keras 3 layers only (no backend-specific code), so the same model trains on TensorFlow or JAX and
its `.keras` file loads on either. Keras is imported only by the functions that build or read a
network: `ModelConfig` is read by code that never runs one (the artifact check, the command line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model.records.config import CELLS, ModelConfig, Recipe

if TYPE_CHECKING:
    import keras

def cell_layer(cell: str) -> type:
    import keras

    return getattr(keras.layers, CELLS[cell])


def build_model(config: ModelConfig, vocab_size: int, recipe: Recipe | None = None) -> keras.Model:
    """Logits for every position: (B, T) int ids -> (B, T, vocab_size). `recipe` adds the training
    recipe's dropouts and weight drop (model/training/recipe.py): the network it trains has the same weights,
    in the same order, as the one without (copy_weights moves them to it)."""
    import keras

    from model.training.recipe import recurrent_layer

    recipe = recipe or Recipe()

    def dropout(rate: float, name: str, over_features: bool = False):
        # (B, 1, F): one mask per window, every time step (locked); (B, T, 1): whole positions
        shape = (None, None, 1) if over_features else (None, 1, None) if recipe.locked else None
        return keras.layers.Dropout(rate, noise_shape=shape, name=name)

    inputs = keras.Input(shape=(None,), dtype="int32", name="chars")
    x = keras.layers.Embedding(vocab_size, config.embedding, name="embedding")(inputs)
    if recipe.embedding_dropout:
        x = dropout(recipe.embedding_dropout, "embedding_dropout", over_features=True)(x)
    if recipe.input_dropout:
        x = dropout(recipe.input_dropout, "input_dropout")(x)
    rnn = recurrent_layer(cell_layer(config.cell), recipe)
    extra = {"weight_drop": recipe.weight_drop} if recipe.weight_drop else {}
    for i in range(config.layers):
        x = rnn(config.units, return_sequences=True, name=f"rnn_{i + 1}", **extra)(x)  # (B, T, H)
        if config.dropout and i < config.layers - 1:
            x = dropout(config.dropout, f"dropout_{i + 1}")(x)
    if recipe.output_dropout:
        x = dropout(recipe.output_dropout, "output_dropout")(x)
    logits = keras.layers.Dense(vocab_size, name="logits")(x)  # (B, T, V)
    return keras.Model(inputs, logits, name=f"chargen_{config.cell}")


def copy_weights(weights: list, model: keras.Model) -> None:
    """Give `model` these trainable weights (numpy arrays, in its trainable variables' order: what
    another build of the same config, with or without a recipe, has)."""
    variables = model.trainable_variables
    if len(weights) != len(variables):
        raise ValueError(f"expected {len(variables)} weight arrays, got {len(weights)}")
    for variable, value in zip(variables, weights):
        if tuple(variable.shape) != tuple(value.shape):
            raise ValueError(f"{variable.path}: expected shape {tuple(variable.shape)}, got {tuple(value.shape)}")
        variable.assign(value)


def trainable_weights(model: keras.Model) -> list:
    import keras

    return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]


def config_of(model: keras.Model) -> ModelConfig:
    """Read the network's configuration back from a built model (used to check artifacts)."""
    import keras

    rnns = [layer for layer in model.layers if layer.name.startswith("rnn_")]
    if not rnns:
        raise ValueError("model has no recurrent layers named rnn_1, rnn_2, ...")
    kinds = {type(layer) for layer in rnns}
    cell = next((name for name in CELLS if {cell_layer(name)} == kinds), None)
    if cell is None:
        raise ValueError(f"model mixes or uses unknown recurrent layers: {sorted(k.__name__ for k in kinds)}")
    dropouts = [layer.rate for layer in model.layers
                if isinstance(layer, keras.layers.Dropout) and layer.name.startswith("dropout_")]  # between layers
    embedding = model.get_layer("embedding")
    return ModelConfig(
        cell=cell,
        layers=len(rnns),
        units=rnns[0].units,
        embedding=embedding.output_dim,
        dropout=float(dropouts[0]) if dropouts else 0.0,
    )


def count_parameters(model: keras.Model) -> int:
    return int(sum(w.size for w in model.get_weights()))
