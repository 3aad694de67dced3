"""The training side: the Keras network and recipe, corpora and batches, the training run,
evaluation, and writing artifacts with their ONNX graphs. It may use the runtime (samples during
training run the artifact's graph on it); nothing on the runtime side imports it."""
