"""Deterministic workflow code and the contracts workflows, activities and the gateway share."""
