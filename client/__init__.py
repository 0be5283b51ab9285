"""The site: Flower ClientApp, the site's data, the local LoRA trainer (plain and
DP-SGD), and the site's side of a deployment.

Installed as `fedtune.client`, the one name its modules have: Flower loads only
`client/flower_app.py` from the app folder, which imports the ClientApp from there.
Modules here import each other relatively and import only the core (`fedtune.*`)."""
