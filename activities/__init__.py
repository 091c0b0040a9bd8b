"""Temporal activities: thin wrappers that call `modelium` and perform the side effects."""

from __future__ import annotations

from temporalio.exceptions import ApplicationError, ApplicationErrorCategory


def expected_failure(message: str, error_type: str) -> ApplicationError:
    """An outcome the workflow handles (a broken directory, no room, a dead runtime), not a
    worker fault to trace: not retried, and logged by Temporal as benign."""
    return ApplicationError(message, type=error_type, non_retryable=True, category=ApplicationErrorCategory.BENIGN)
