"""Domain errors. Services map these to gRPC status codes in one place."""


class PdmeshError(Exception):
    """Base of every error pdmesh raises on purpose."""


class InvalidRequestError(PdmeshError, ValueError):
    """The request can never be served as given (bad ids, too long, bad parameters)."""


class RequestNotFoundError(PdmeshError, KeyError):
    """No request with that id is known (finished, aborted or never added)."""


class WorkerLostError(PdmeshError):
    """The worker can no longer serve (a tensor-parallel rank died)."""


class OverloadedError(PdmeshError):
    """No capacity to take the request now (a bounded queue is full): retry later."""
