"""Test-only helpers shared by the tests and the benchmarks: Flower mods that audit or
fail a site, wire observers, and process management. Nothing here ships in the product."""
