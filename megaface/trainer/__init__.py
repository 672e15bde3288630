"""Training internals: setup, checkpoints (the CLI and the train step live in megaface.train)."""
