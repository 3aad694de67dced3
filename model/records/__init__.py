"""The records both sides read: the vocabulary, the network's config and the training recipe, an
artifact's metadata, the sampling defaults. Plain dataclasses with strict readers; nothing here
imports the runtime, the training side, Keras or ONNX (pyproject.toml's import contracts)."""
