"""Error answers: the 422 handler (always serializable) and the error responses every operation declares."""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field


class ErrorOut(BaseModel):
    detail: str = Field(description="what went wrong and what to fix")


class ValidationErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where: body, query, path or header, then the field")
    msg: str
    type: str
    input: Any = Field(None, description="the refused value, when it can be shown")
    ctx: dict[str, Any] | None = None


class ValidationErrorOut(BaseModel):
    detail: str | list[ValidationErrorItem] = Field(
        description="a message, or one entry per wrong field (FastAPI's validation errors)")


def _json_safe(value: Any, depth: int = 0) -> Any:
    """`value` with what JSON cannot hold (NaN, infinities, bytes, objects) turned into text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if depth > 8:
        return "..."
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value[:50]]
    if isinstance(value, bytes):
        return value[:200].decode("utf-8", "replace")
    return str(value)


def _clean(error: dict[str, Any]) -> dict[str, Any]:
    out = {"loc": [p if isinstance(p, int | str) else str(p) for p in error.get("loc", ())],
           "msg": str(error.get("msg", "")), "type": str(error.get("type", "value_error"))}
    if "input" in error:
        out["input"] = _json_safe(error["input"])
    if isinstance(error.get("ctx"), dict):
        out["ctx"] = {str(k): _json_safe(v) for k, v in error["ctx"].items()}
    return out


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one entry per wrong field; the refused input is echoed only in a form JSON can carry."""
    return JSONResponse({"detail": [_clean(e) for e in exc.errors()]}, status_code=422)


_DESCRIPTIONS = {
    400: "the multipart body could not be read",
    401: "missing, wrong or revoked API key",
    403: "the endpoint needs an admin key",
    404: "no such id for this tenant (another tenant's ids answer the same)",
    409: "the request conflicts with the current state; the message says why",
    413: "request body over the size limit",
    422: "a field is wrong; the message names it and says what to fix",
    503: "the task broker or database is unavailable; try again",
}


def error_responses(*codes: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the given status codes; `descriptions` (e.g. s409="...") override the default."""
    return {code: {"model": ValidationErrorOut if code == 422 else ErrorOut,
                   "description": descriptions.get(f"s{code}", _DESCRIPTIONS[code])} for code in codes}


# Every /v1 operation: a key is needed, parameters may be wrong, and any body is size-capped (BodySizeLimit).
COMMON = error_responses(401, 413, 422)
WITH_ID = error_responses(404)
