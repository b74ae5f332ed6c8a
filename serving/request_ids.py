"""Request ids a client may choose, and whose they are.

A client-chosen id (``GenerateRequest.request_id`` or the ``x-request-id`` header) is at most
128 printable ASCII token characters; anything else is refused with INVALID_ARGUMENT and
never reaches a log line or a worker. Inside the mesh a client-chosen id is namespaced by its
caller (the API key, else the mutual-TLS identity, else the connection), so one caller can
neither abort, probe nor squat another's ids. An id the gateway made for a request (a random
UUID) is not namespaced: whoever holds it may abort that request.
"""

from __future__ import annotations

import contextvars
import hashlib
import string

from engine.errors import InvalidRequestError

MAX_REQUEST_ID_CHARS = 128
#: RFC 9110 token characters, plus ``:/=@`` (UUIDs, paths and base64 ids fit).
REQUEST_ID_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~:/=@")
#: What log lines show for an id that is not valid (the id itself never appears).
INVALID_ID = "invalid-id"
#: Set by the gateway's call interceptor when it made the current call's id itself.
server_made_id: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pdmesh_server_made_id", default=False
)


def is_valid_request_id(value: str) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID_CHARS and set(value) <= REQUEST_ID_CHARS


def check_request_id(value: str, where: str = "request_id") -> None:
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(f"{where} is longer than {MAX_REQUEST_ID_CHARS} characters")
    if not is_valid_request_id(value):
        raise InvalidRequestError(
            f"{where} may hold only printable ASCII token characters "
            "(letters, digits and !#$%&'*+-.^_`|~:/=@)"
        )


def loggable(value: str | None) -> str | None:
    """``value`` if it may appear in a log line, else a placeholder."""
    if value is None or is_valid_request_id(value):
        return value
    return INVALID_ID


def caller_name(token: str | None, identity: str | None, peer: str) -> str:
    """Who is calling, for the namespace of its ids: the API key it presented (the auth
    check admitted it), else its mutual-TLS identity, else its connection."""
    if token:
        return f"key:{token}"
    if identity:
        return f"tls:{identity}"
    return f"peer:{peer}"


def namespaced(owner: str, request_id: str) -> str:
    """The mesh-internal id of ``owner``'s ``request_id`` ("" owner: a gateway-made id)."""
    if not owner:
        return request_id
    return f"{hashlib.sha256(owner.encode()).hexdigest()[:16]}-{request_id}"
