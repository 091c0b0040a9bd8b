"""Temporal activities: thin wrappers that call `modelium` and perform the side effects."""
