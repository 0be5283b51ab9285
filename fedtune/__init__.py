"""fedtune: federated LoRA fine-tuning with Flower, where only adapters leave a site."""

__version__ = "0.1.0"
