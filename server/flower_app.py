"""What Flower loads from the app folder (pyproject's `serverapp = "server.flower_app:app"`):
the coordinator's ServerApp, imported from the installed package, so that every
coordinator module has one name (`fedtune.server.*`) in every process."""

from fedtune.server.app import app

__all__ = ["app"]
