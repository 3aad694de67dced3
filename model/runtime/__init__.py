"""What a server worker and `chargen sample` load: reading an artifact and checking its graph, the
ONNX Runtime step, the sampler, streams, the engine and the prompt cache. It never imports the
training side, Keras, TensorFlow, JAX or onnx (pyproject.toml's import contracts, checked by
tests/test_layout.py)."""
