"""Workflow code on a real Temporal dev server, with real or stubbed activities, and replays of
recorded histories."""
