"""What the model workflow's steps fail with, and how it reads an activity's failure."""

from __future__ import annotations

from temporalio.exceptions import ActivityError, ApplicationError, FailureError


class Interrupted(Exception):
    """A bring-up step noticed that the model was removed or its files changed."""


class NodeGone(Interrupted):
    """The node an activity was waiting on was declared lost; the activity was cancelled."""


def valid_bytes(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 2**60


def error_type(err: BaseException) -> str | None:
    """The `ApplicationError.type` at the root of an activity failure."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ApplicationError) and cause.type:
            return cause.type
        cause = cause.__cause__
    return None


def describe(err: BaseException) -> str:
    """The innermost message of an activity failure: what the user needs to read."""
    cause: BaseException | None = err
    message = str(err)
    while cause is not None:
        if isinstance(cause, FailureError) and not isinstance(cause, ActivityError):
            message = cause.message
        cause = cause.__cause__
    return message
