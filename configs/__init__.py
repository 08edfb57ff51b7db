"""Stage configs (YAML), shipped as package data so an installed zhllama finds them."""
