"""Every error leaves the server in OpenAI's format, {"error": {message, type, param, code}},
and each kind of failure is mapped to its status here, once."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmos.errors import InvalidRequestError, LLMOSError, PromptTooLongError, QueueFullError

log = logging.getLogger("llmos.server")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error with its HTTP status; raise it anywhere in a request."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def not_found(message: str, code: str = "not_found", param: str | None = None) -> APIError:
    return APIError(404, message, param=param, code=code)


# Kernel errors by class name (so errors replayed from a durable process's journal, which
# carry only the name, map the same): status, type, code.
_KINDS = {
    "PermissionDenied": (403, "permission_error", "permission_denied"),
    "LimitExceeded": (403, "permission_error", "limit_exceeded"),
    "NoSuchProcess": (404, "invalid_request_error", "process_not_found"),
    "NotFound": (404, "invalid_request_error", "not_found"),
    "NoSuchMessage": (404, "invalid_request_error", "message_not_found"),
    "DeadlockError": (409, "invalid_request_error", "deadlock"),
    "Nondeterminism": (409, "invalid_request_error", "nondeterminism"),
    "NameTaken": (409, "invalid_request_error", "name_taken"),
    "MailboxFull": (429, "rate_limit_error", "mailbox_full"),
    "MessageTooLarge": (413, "invalid_request_error", "message_too_large"),
    "QuotaExceeded": (413, "invalid_request_error", "quota_exceeded"),
    "PathEscape": (400, "invalid_request_error", "path_escape"),
    "InvalidRequestError": (400, "invalid_request_error", "invalid_value"),
    "PromptTooLongError": (413, "invalid_request_error", "context_length_exceeded"),
    "NoSuchTool": (404, "invalid_request_error", "tool_not_found"),
    "ToolArgumentError": (400, "invalid_request_error", "invalid_tool_arguments"),
    # A tool that fails is not llmos failing: 424 (Failed Dependency), the code says how.
    "ToolError": (424, "tool_error", "tool_error"),
    "MCPError": (424, "tool_error", "tool_error"),
    "SandboxError": (424, "tool_error", "tool_error"),
    "SandboxFailed": (424, "tool_error", "tool_error"),
    "SandboxLimit": (424, "tool_error", "tool_limit"),
    "ToolTimeout": (424, "tool_error", "tool_timeout"),
    "SandboxTimeout": (424, "tool_error", "tool_timeout"),
    "CalculatorError": (400, "invalid_request_error", "invalid_tool_arguments"),
    "ToolBusy": (429, "rate_limit_error", "tool_busy"),
    "ApprovalDenied": (403, "permission_error", "approval_denied"),
    "NoSuchApproval": (404, "invalid_request_error", "approval_not_found"),
    "AlreadyDecided": (409, "invalid_request_error", "already_decided"),
    "VersionConflict": (409, "invalid_request_error", "version_conflict"),
    "MemoryFull": (413, "invalid_request_error", "quota_exceeded"),
    "NoSuchAdapter": (404, "invalid_request_error", "adapter_not_found"),
    "AdapterNotAllowed": (403, "permission_error", "adapter_not_allowed"),
    "AdapterBusy": (409, "invalid_request_error", "adapter_in_use"),
    "AdapterMemoryFull": (429, "rate_limit_error", "adapter_memory_full"),
    "HostProgramNotAllowed": (403, "permission_error", "admin_required"),
    "JailError": (503, "server_error", "confinement_unavailable"),
}


def from_llmos(e: LLMOSError) -> APIError:
    """The HTTP form of an error the engine or kernel raised."""
    message = str(e)
    param = message.split(":", 1)[0] if ":" in message and " " not in message.split(":", 1)[0] else None
    kind = getattr(e, "kind", None) or type(e).__name__
    if kind in _KINDS:
        status, type_, code = _KINDS[kind]
        param = getattr(e, "capability", None) or getattr(e, "limit", None) or getattr(e, "param", None) or param
        return APIError(status, message, type_, param=param, code=code,
                        retry_after=1 if status == 429 else None)
    if isinstance(e, PromptTooLongError):
        return APIError(413, message, param=param or "messages", code="context_length_exceeded")
    if isinstance(e, InvalidRequestError):
        return APIError(400, message, param=param, code="invalid_value")
    if isinstance(e, QueueFullError):
        return APIError(429, message, "rate_limit_error", code="queue_full", retry_after=1)
    return APIError(500, message, "server_error", code="internal_error")


def error_body(e: Exception) -> dict:
    """The error event a stream ends with when its request fails after the response began."""
    if isinstance(e, LLMOSError):
        return from_llmos(e).body()
    log.error("request failed: %r", e)
    return APIError(500, "internal server error", "server_error", code="internal_error").body()


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                 503: "service_unavailable"}


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(LLMOSError)
    async def llmos_error(request: Request, e: LLMOSError) -> JSONResponse:
        err = from_llmos(e)
        if err.status >= 500:
            log.error("request failed: %s", e)
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = e.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        msg = str(first.get("msg", "")).removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if sep and " " not in head:    # a model-level check names its field itself: "top_logprobs: ..."
            loc, msg = loc + [head], rest
        param = ".".join(loc) or None
        message = f"{param}: {msg}" if param else msg
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problem(s))"
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        err = APIError(e.status_code, str(e.detail), _STATUS_TYPES.get(e.status_code, "invalid_request_error"),
                       code=None)
        response = err.response()
        for k, v in (e.headers or {}).items():
            response.headers[k] = v
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error", "server_error", code="internal_error").response()
