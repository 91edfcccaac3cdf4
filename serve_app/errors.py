"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException


logger = logging.getLogger("serve_app")


class APIError(Exception):
    """A request the server refuses; becomes an error body with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_for(err: BaseException, where: str) -> APIError:
    """The client's view of an exception: a short message and an error type. Details
    (tracebacks, paths, actor ids, pids, addresses) go to the server log only."""
    from spmd import RequestFailedError
    from spmd.async_engine import EngineDeadError, LoRANotFoundError
    from spmd.lora import LoRAInUseError

    if isinstance(err, APIError):
        return err
    if isinstance(err, LoRAInUseError):  # a ValueError, but the client is not at fault
        return APIError(409, str(err), param="lora_name", code="lora_in_use")
    if isinstance(err, LoRANotFoundError):
        return APIError(404, err.args[0], param="lora_name", code="lora_not_found")
    if isinstance(err, ValueError):
        return bad_value(err)
    if isinstance(err, EngineDeadError):
        logger.warning("%s: engine unavailable: %s", where, err)
        return APIError(503, "the engine is unavailable (it stopped after a failure and is "
                        "restarting, or the server is shutting down); retry later",
                        code="engine_unavailable")
    if isinstance(err, RequestFailedError):  # its message is ours, written for clients
        return APIError(500, err.args[0].split(": ", 1)[-1], code="request_failed")
    ref = uuid.uuid4().hex[:12]
    logger.error("%s failed (reference %s)", where, ref, exc_info=err)
    return APIError(500, f"internal server error (reference {ref} in the server log)",
                    code="internal_error")


def bad_value(err: ValueError) -> APIError:
    """A 400 from the engine's or ``SamplingParams``' ``ValueError`` ("field: limit")."""
    message = str(err)
    field, sep, _ = message.partition(":")
    # "tools[1].function.name: missing" names the request's field "tools".
    path = re.fullmatch(r"([A-Za-z_]\w*)(?:\[\d+\]|\.[\w$]+)*", field) if sep else None
    return APIError(400, message, param=path.group(1) if path else None)


def bad_schema(err: ValidationError | RequestValidationError) -> APIError:
    """A 400 (not FastAPI's 422) for a body of the wrong shape or types."""
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    message = f"{loc}: {first['msg']}" if loc else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    return APIError(400, message, param=str(first["loc"][0]) if first["loc"] else None)


def install_handlers(app: FastAPI) -> None:
    """Every error the app or Starlette raises leaves in the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return APIError(err.status_code, str(err.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return bad_schema(err).response()
