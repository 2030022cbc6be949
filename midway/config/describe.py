"""Configuration values named in words, for error messages.

TOML has more types than a message should show as Python reprs
(``datetime.datetime(1979, 5, 27, 7, 32)``, ``{'a': 1}``): a user who wrote a
date where a number belongs reads ``got a date-time (1979-05-27T07:32:00)``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["describe_value"]


def describe_value(value: Any) -> str:
    """A TOML value as an error message shows it: numbers and booleans as
    written in TOML, anything else named in words (``the string "5"``, ``a
    table``, ``a date-time (1979-05-27T07:32:00)``), never a Python repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return f"the string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array" if value else "an empty array"
    # datetime before date: a datetime is a date too.
    if isinstance(value, datetime.datetime):
        return f"a date-time ({value.isoformat()})"
    if isinstance(value, datetime.date):
        return f"a date ({value.isoformat()})"
    if isinstance(value, datetime.time):
        return f"a time of day ({value.isoformat()})"
    return f"a value of type {type(value).__name__}"
