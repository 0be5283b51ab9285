"""Edge export and the device runtime.

Export side (needs torch): `exporter.export_bundle` merges a run's final adapter,
exports ONNX with optimum, quantises it to INT8 with onnxruntime, gates it on parity
with the PyTorch model and writes a signed bundle.

Device side (no torch, no transformers): `runtime.EdgeModel` verifies a bundle's
signature and every file's sha256, then runs it with onnxruntime and `tokenizers`.
Nothing is imported here, so `import edge_export.runtime` stays light.
"""
