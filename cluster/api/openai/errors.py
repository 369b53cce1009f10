"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status
OpenAI's clients act on: 400 a bad field, 401 a missing or wrong key, 404 an unknown model or path,
413 a prompt too long for the context window, 429 the queue full (with `Retry-After`), 503 the
router draining or no replica serving (with `Retry-After`), 500 anything else. The router's own
exceptions (`InvalidRequest`, `Refused`, a replica's failure) map here, so both doors refuse the
same requests for the same reasons, each in its own words."""

from __future__ import annotations

import logging
from typing import Callable

import grpc
from starlette.responses import JSONResponse

from cluster.api.admission import Refused
from cluster.api.validate import InvalidRequest
from cluster.engine.engine import ReplicaFailed, ReplicaUnavailable
from cluster.engine.request import RequestError

log = logging.getLogger(__name__)

# The fields whose OUT_OF_RANGE means "the prompt does not fit the context window" (413), as
# `cluster.api.validate` names them; any other OUT_OF_RANGE field is a bad value (400).
_PROMPT_FIELDS = frozenset({"chat", "prompt", "token_ids", "token_ids.ids"})
RETRY_AFTER_S = "1"


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: bool = False):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": RETRY_AFTER_S} if self.retry_after else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_field(param: str, problem: str) -> APIError:
    return APIError(400, f"{param}: {problem}", param=param, code="invalid_value")


def unauthorized() -> APIError:
    return APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with one of the "
                         "keys in router.api_keys_file (or the token in router.auth_token_file)",
                    code="invalid_api_key")


def unknown_model(name: object, served: str) -> APIError:
    return APIError(404, f"model: {name!r} is not served here; this router serves {served!r} (GET /v1/models)",
                    param="model", code="model_not_found")


def api_error(e: BaseException, rename: Callable[[str], str]) -> APIError:
    """The OpenAI error for an exception of the router; `rename` turns a caravan.v1 field path into
    the request's own (`sampling.temperature` -> `temperature`)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequest):
        param = rename(e.field)
        message = f"{param}: {e.problem}"
        if e.code == grpc.StatusCode.OUT_OF_RANGE and e.field in _PROMPT_FIELDS:
            return APIError(413, message, param=param, code="context_length_exceeded")
        return APIError(400, message, param=param, code="invalid_value")
    if isinstance(e, Refused):
        if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded", retry_after=True)
        return APIError(503, str(e), type="service_unavailable_error", code="service_unavailable", retry_after=True)
    if isinstance(e, ReplicaUnavailable):
        return APIError(503, str(e), type="service_unavailable_error", code="service_unavailable", retry_after=True)
    if isinstance(e, ReplicaFailed):
        return APIError(503, f"the replica failed: {e}", type="service_unavailable_error", code="service_unavailable",
                        retry_after=True)
    if isinstance(e, RequestError):  # the replica's own check (Ray wraps it: its cause is the message)
        return APIError(413, str(getattr(e, "cause", None) or e), code="context_length_exceeded")
    log.exception("internal error", exc_info=e)
    # The exception's own text may hold anything (paths, tokens, other requests): it stays in the log.
    return APIError(500, "internal error in the router; its log has the details", type="server_error",
                    code="internal_error")
