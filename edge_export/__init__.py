"""The export: merge a run's final adapter into the base model, export ONNX with
optimum, fuse and quantise it to INT8 with onnxruntime, gate it on parity with the
PyTorch model on held-out data (through the device runtime), and sign the bundle.

Needs torch; the device side it produces bundles for is `fedtune.edge_device`.
Nothing is imported here, so `import fedtune.edge_export.signing` stays light."""
