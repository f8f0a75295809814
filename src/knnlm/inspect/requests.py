"""What a request to the page's server may hold: bounded sizes, typed fields, one clear
message for each mistake (the server answers it with a 4xx, never a traceback)."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any

from knnlm.inspect.view import ViewSettings

MAX_BODY = 64 * 1024  # bytes of one request
MAX_CHARS = 20_000  # characters of one text (the token bound is the server's --max-tokens)
SETTING_TYPES = {f.name: (int if f.type in (int, "int") else float) for f in fields(ViewSettings)}


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object (400 for bytes that are not one, 413 when too large)."""
    if len(body) > MAX_BODY:
        raise RequestError(413, f"the request is over {MAX_BODY} bytes")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deep nesting
        raise RequestError(400, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise RequestError(422, "the request body must be a JSON object")
    return data


def number(data: dict, name: str, kind: type) -> int | float:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(422, f"{name} must be a number")
    if kind is int and (isinstance(value, float) and not value.is_integer()):
        raise RequestError(422, f"{name} must be a whole number")
    if not math.isfinite(value) or abs(value) > 1e9:
        raise RequestError(422, f"{name} is out of range")
    return kind(value)


def parse_request(data: dict, defaults: ViewSettings, extra: tuple[str, ...] = ()) -> tuple:
    """(text, settings, token or None, {extra field: int}) of a view or generate request."""
    allowed = {"text", "token", *SETTING_TYPES, *extra}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}")
    text = data.get("text")
    if not isinstance(text, str):
        raise RequestError(422, "text must be a string")
    if len(text) > MAX_CHARS:
        raise RequestError(413, f"the text is {len(text)} characters; at most {MAX_CHARS}")
    values = {n: number(data, n, t) for n, t in SETTING_TYPES.items() if n in data}
    settings = ViewSettings(**{**defaults.__dict__, **values})
    token = None if data.get("token") is None else number(data, "token", int)
    more = {n: number(data, n, int) for n in extra if n in data}
    return text, settings, token, more
