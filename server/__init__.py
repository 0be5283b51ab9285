"""The coordinator: Flower ServerApp, strategy choice, secure aggregation, checkpoints
and resume, traffic metering, central evaluation, the end-of-run report, and the
coordinator's side of a deployment.

Installed as `fedtune.server`, the one name its modules have: Flower loads only
`server/flower_app.py` from the app folder, which imports the ServerApp from there.
Modules here import each other relatively and import only the core (`fedtune.*`)."""
