"""Composition roots: the only place where Temporal, the gateway and the domain are wired."""
