"""Modelium's domain library: configuration, model analysis, the brain, runtime adapters,
placement ledger, metrics and the folder watcher. It never imports Temporal or the gateway."""

__version__ = "0.1.0"
