"""DeepSpeed configs (JSON), shipped as package data."""
