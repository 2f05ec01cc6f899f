"""nanochat: a minimal LLM pretraining speedrun. See README.md and the module docstrings."""
