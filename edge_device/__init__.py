"""The device: verify a signed bundle (Ed25519 signature, every file's sha256, on the
bytes that are then loaded), run it with onnxruntime and `tokenizers`, and pull new
versions from the registry with resume, atomic switch and rollback.

It imports no torch, transformers, peft or flwr, and nothing from training or the
registry server (only the registry's wire contract, `fedtune.registry.protocol` and
its generated stubs): `pip install "fedtune[edge]"` is all a device needs."""
