"""Errors as RFC 9457 ``application/problem+json``: every error response of the API has this shape.

``{"type": "about:blank", "title": "Not Found", "status": 404, "detail": "study 12 does not exist",
"fix": "...", "instance": "/v1/studies/12"}``. ``detail`` always says what went wrong in words a user
can act on; ``fix`` (an extension member) says what to do, where the error knows it.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import DosebenchError, InputError

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("dosebench.api")


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(self, status: int, detail: str, *, fix: str = "", headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.fix = fix
        self.headers = headers
        self.extra = extra


def problem_response(status: int, detail: str, *, instance: str = "", fix: str = "",
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if fix:
        body["fix"] = fix
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _location(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "request"


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.detail, instance=request.url.path, fix=exc.fix,
                                headers=exc.headers, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem_response(exc.status_code, detail, instance=request.url.path,
                                headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        lines = [f"{_location(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors]
        return problem_response(
            422, "invalid request: " + "; ".join(lines), instance=request.url.path,
            fix="correct the listed fields (see /docs for the request schema)",
            errors=[{"field": _location(e.get("loc", ())), "message": e.get("msg", "")} for e in errors])

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONResponse:
        return problem_response(422, exc.problem, instance=request.url.path, fix=exc.fix)

    @app.exception_handler(DosebenchError)
    async def _dosebench(request: Request, exc: DosebenchError) -> JSONResponse:
        return problem_response(400, exc.problem, instance=request.url.path, fix=exc.fix)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, f"internal error ({type(exc).__name__}); the server log has the details",
                                instance=request.url.path)
