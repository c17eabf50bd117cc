"""One error hierarchy for every service, each class carrying its protocol status.

The mapping to HTTP happens once in the gateway's middleware and the mapping to NATS once in
`broker.codec`; everywhere else code raises the class that names the case.
"""

from __future__ import annotations


class NatronError(Exception):
    """Base error; `status` is the HTTP status Triton's protocol uses for the case."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @staticmethod
    def from_status(status: int, message: str) -> NatronError:
        """Rebuild the right subclass from a status received over the wire."""
        cls = _BY_STATUS.get(status, InternalError)
        err = cls(message)
        err.status = status
        return err


class InvalidArgument(NatronError):
    """A client mistake: malformed body, wrong input, wrong shape or datatype."""

    status = 400


class NotFound(NatronError):
    status = 404


class PayloadTooLarge(NatronError):
    status = 413


class Unsupported(NatronError):
    status = 501


class Unavailable(NatronError):
    """No worker serves the model, or its queue is full: retrying later may succeed."""

    status = 503


class DeadlineExceeded(NatronError):
    status = 504


class InternalError(NatronError):
    status = 500


_BY_STATUS: dict[int, type[NatronError]] = {
    400: InvalidArgument,
    404: NotFound,
    413: PayloadTooLarge,
    500: InternalError,
    501: Unsupported,
    503: Unavailable,
    504: DeadlineExceeded,
}
