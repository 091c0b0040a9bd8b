"""Modelium as it runs: real Temporal, gateway, node agent and runtime processes serving tiny
local models; several start `modelium serve` or its roles as processes."""
