"""The coordinator: Flower ServerApp, strategy choice, secure aggregation, checkpoints
and resume, traffic metering, central evaluation, the end-of-run report, and the
coordinator's side of a deployment.

Installed as `fedtune.server`; Flower loads it from the app folder as `server`, so
modules here import each other relatively and import only the core (`fedtune.*`)."""
