"""fedtune: federated LoRA fine-tuning with Flower, where only adapters leave a site.

The `fedtune/` folder is the shared core (config, data, model and LoRA, adapter I/O,
evaluation, metrics, errors, SecAgg+ masks); it imports no stage. Each stage of the flow
has a folder of its own, installed under this name (see pyproject.toml):

    client/       fedtune.client       the site: ClientApp, trainers, site data
    server/       fedtune.server       the coordinator: ServerApp, strategies, SecAgg+, report
    edge_export/  fedtune.edge_export  merge, ONNX, INT8, parity gate, signing
    edge_device/  fedtune.edge_device  verify, run, pull, roll back (no torch)
    registry/     fedtune.registry     the gRPC model registry and its stubs
    cli/          fedtune.cli          the composition roots: the CLI and the simulation launcher
"""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft whenever it is installed) warns on CPUs with AVX512-BF16
# that it could not fetch an optional kernel from the Hugging Face hub; fedtune runs
# offline and bitsandbytes' own 4-bit kernels serve. Set here, before any import of peft.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
