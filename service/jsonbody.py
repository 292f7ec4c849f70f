"""Strict JSON request bodies: no NaN or infinities, no absurdly long integers, no deep nesting.

Python's json module accepts NaN, Infinity and numbers like 1e309 (which become inf). Such values would be
stored as null, fail later in a worker, or make the validation error itself unserializable, so a body holding
one is answered 422 naming the field before any handler runs. Routers use `StrictJSONRoute` as route_class.
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


def refused_values(value: Any) -> list[dict[str, Any]]:
    """Validation errors for every refused literal in a parsed body, and for nesting deeper than MAX_DEPTH."""
    errors, stack = [], [(value, ("body",), 0)]
    while stack:
        item, loc, depth = stack.pop()
        if isinstance(item, _Refused):
            errors.append(_error(loc, item.kind, item.msg, item.literal))
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


class StrictJSONRoute(APIRoute):
    """An APIRoute whose JSON body is parsed by `parse_body` before FastAPI reads it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict_handler(request: Request) -> Response:
            if _is_json(request.headers.get("content-type")):
                body = await request.body()
                if body:
                    # Starlette's Request.json() returns this cached value instead of parsing again.
                    request._json = parse_body(body)
            return await handler(request)

        return strict_handler
