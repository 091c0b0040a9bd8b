"""Runtime adapters: each starts a model somewhere and gives back an HTTP endpoint."""
