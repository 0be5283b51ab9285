"""The site: Flower ClientApp, the site's data, the local LoRA trainer (plain and
DP-SGD), and the site's side of a deployment.

Installed as `fedtune.client`; Flower loads it from the app folder as `client`, so
modules here import each other relatively and import only the core (`fedtune.*`)."""
