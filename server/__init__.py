"""The coordinator side: Flower ServerApp, strategy choice, checkpoints, traffic
metering, central evaluation and the end-of-run report."""
