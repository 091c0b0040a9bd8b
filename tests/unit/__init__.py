"""Tests of one module or function at a time: no Temporal server, no runtime process."""
