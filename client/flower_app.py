"""What Flower loads from the app folder (pyproject's `clientapp = "client.flower_app:app"`):
the site's ClientApp, imported from the installed package, so that every site module has
one name (`fedtune.client.*`) in every process."""

from fedtune.client.app import app

__all__ = ["app"]
