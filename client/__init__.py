"""The site side: Flower ClientApp, the site's data and the local LoRA trainer."""
