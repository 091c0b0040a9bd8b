"""The HTTP gateway: asks workflows where a model runs and proxies requests to it."""
