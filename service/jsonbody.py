"""Strict request input: JSON bodies without NaN, infinities, absurdly long integers or deep nesting, and no
NUL character in any body string or query parameter.

Python's json module accepts NaN, Infinity and numbers like 1e309 (which become inf). Such values would be
stored as null, fail later in a worker, or make the validation error itself unserializable; PostgreSQL refuses
text holding NUL. So a request holding one is answered 422 naming the field before any handler runs. Routers
use `StrictRoute` as route_class.
"""

from __future__ import annotations

import email.message
import json
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

MAX_DEPTH = 32
MAX_INT_DIGITS = 64


@dataclass(frozen=True)
class _Refused:
    """Stands in for a literal the body may not hold, until the walk reports where it was."""

    literal: str
    kind: str
    msg: str


def _constant(text: str) -> _Refused:
    return _Refused(text, "finite_number", "Input should be a finite number (NaN and infinities are not accepted)")


def _float(text: str) -> float | _Refused:
    value = float(text)
    if math.isfinite(value):
        return value
    return _Refused(text, "finite_number", "Input should be a finite number (this one overflows to infinity)")


def _int(text: str) -> int | _Refused:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        return _Refused(text[:24] + "...", "int_too_long", f"Input should be an integer of at most {MAX_INT_DIGITS} "
                        "digits")
    return int(text)


def _error(loc: tuple, kind: str, msg: str, literal: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg}
    if literal is not None:
        error["input"] = literal
    return error


NUL_MSG = "Text may not contain the NUL character (\\u0000)"


def refused_values(value: Any) -> list[dict[str, Any]]:
    """Validation errors for every refused literal or NUL-holding string (or key) in a parsed body, and for
    nesting deeper than MAX_DEPTH."""
    errors, stack = [], [(value, ("body",), 0)]
    while stack:
        item, loc, depth = stack.pop()
        if isinstance(item, _Refused):
            errors.append(_error(loc, item.kind, item.msg, item.literal))
            continue
        if isinstance(item, str) and "\x00" in item or isinstance(item, dict) and any("\x00" in k for k in item):
            errors.append(_error(loc, "string_nul", NUL_MSG))
            continue
        children = list(item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ())
        if children and depth >= MAX_DEPTH:
            errors.append(_error(loc, "json_too_deep", f"JSON nested deeper than {MAX_DEPTH} levels"))
            continue
        stack.extend((child, (*loc, key), depth + 1) for key, child in reversed(children))
    return errors


def parse_body(body: bytes) -> Any:
    """The parsed body; RequestValidationError naming each refused value."""
    try:
        value = json.loads(body, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise RequestValidationError([_error(("body",), "json_too_deep", "JSON nested too deeply")]) from None
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        position = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
        raise RequestValidationError([_error(("body", position), "json_invalid", f"JSON decode error: {exc}")]) \
            from None
    errors = refused_values(value)
    if errors:
        raise RequestValidationError(errors)
    return value


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # FastAPI reads a body without a content type as JSON
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _check_query(request: Request) -> None:
    errors = [_error(("query", name), "string_nul", NUL_MSG)
              for name, value in request.query_params.multi_items() if "\x00" in value]
    if errors:
        raise RequestValidationError(errors)


class StrictRoute(APIRoute):
    """An APIRoute that refuses NUL in query parameters and parses a JSON body with `parse_body` before FastAPI
    reads it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        has_body = self.body_field is not None

        async def strict_handler(request: Request) -> Response:
            _check_query(request)
            if has_body and _is_json(request.headers.get("content-type")):
                body = await request.body()
                if body:
                    # Starlette's Request.json() returns this cached value instead of parsing again.
                    request._json = parse_body(body)
            return await handler(request)

        return strict_handler
