"""Literal values -> Python values, with the units the language knows (`10M`, `8.6M`, `5%`, `1e-5`, `2x2`).

Each converter returns the value or raises `ValueProblem` with a code, a message and a hint; the
block reader turns that into a diagnostic at the value's span.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from recipec.syntax import ast

SCALES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


class ValueProblem(Exception):
    def __init__(self, code: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


def describe(value: ast.Value) -> str:
    return {
        ast.String: "a string", ast.Number: "a number", ast.Dims: "a grid", ast.Name: "a name",
        ast.ListValue: "a list", ast.Call: "a call",
    }[type(value)]


def _wrong(expected: str, value: ast.Value, hint: str | None = None) -> ValueProblem:
    return ValueProblem("E201", f"expected {expected}, found {describe(value)}", hint)


# Every number in a recipe lies within a signed 64-bit integer's range once its unit is applied, and
# is zero or at least 1e-100 in size: checked on the literal's exponent before any arithmetic, so
# `1e999999999` costs nothing and no float is ever infinite.
MAX_NUMBER = 2**63 - 1
MIN_EXPONENT = -100
MAX_GRID = 32


def _decimal(value: ast.Number) -> tuple[Decimal, str]:
    text = value.text
    suffix = text[-1] if text[-1] in "KMBT%" else ""
    body = text[:-1] if suffix else text
    try:
        number = Decimal(body)
    except InvalidOperation:  # the grammar admits nothing else, but stay total
        raise ValueProblem("E201", f"`{text}` is not a number") from None
    if not number.is_finite():
        raise ValueProblem("E201", f"`{text}` is not a number")
    if number:
        scale = {"%": -2}.get(suffix, len(str(SCALES.get(suffix, 1))) - 1)
        exponent = number.adjusted() + scale
        if exponent > 18 or (exponent == 18 and abs(number.scaleb(scale)) > MAX_NUMBER):
            raise ValueProblem("E202", f"`{_clip(text)}` is out of range", f"numbers in a recipe are at most {show(MAX_NUMBER)}")
        if exponent < MIN_EXPONENT:
            raise ValueProblem("E202", f"`{_clip(text)}` is too small to be represented", "write 0 if zero is meant")
    return number, suffix


def _clip(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def show(number: float | int) -> str:
    """A number as a message shows it: `4,096`, `0.5`, `9.22e+18` (never a wall of digits)."""
    if isinstance(number, float) and not number.is_integer():
        return f"{number:g}"
    number = int(number)
    return f"{number:,}" if abs(number) < 10**15 else f"{number:.3g}"


def count(value: ast.Value, *, allow_zero: bool = False) -> int:
    """A number of samples: `10M`, `8.6M`, `500K`, `1200`."""
    if not isinstance(value, ast.Number):
        raise _wrong("a count such as `10M` or `500K`", value)
    number, suffix = _decimal(value)
    if suffix == "%":
        raise ValueProblem("E202", f"`{value.text}` is a share, but a count is needed here",
                           "write an absolute count such as `500K`")
    scaled = number * SCALES.get(suffix, 1)
    if scaled != scaled.to_integral_value():
        raise ValueProblem("E202", f"`{value.text}` is not a whole number of samples")
    result = int(scaled)
    if result < 0 or (result == 0 and not allow_zero):
        raise ValueProblem("E202", f"`{value.text}` must be a positive count")
    return result


def integer(value: ast.Value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if not isinstance(value, ast.Number):
        raise _wrong("an integer", value)
    number, suffix = _decimal(value)
    if suffix == "%":
        raise ValueProblem("E201", f"expected an integer, found the share `{value.text}`")
    scaled = number * SCALES.get(suffix, 1)  # `1.5K` is the integer 1500
    if scaled != scaled.to_integral_value():
        raise ValueProblem("E201", f"expected an integer, found `{value.text}`")
    result = int(scaled)
    _bounds(value.text, result, minimum, maximum)
    return result


def real(value: ast.Value, *, minimum: float | None = None, maximum: float | None = None,
         exclusive_minimum: bool = False) -> float:
    if not isinstance(value, ast.Number):
        raise _wrong("a number", value)
    number, suffix = _decimal(value)
    if suffix == "%":
        number = number / 100
    elif suffix:
        number = number * SCALES[suffix]
    result = float(number)
    if exclusive_minimum and minimum is not None and result <= minimum:
        raise ValueProblem("E202", f"`{value.text}` must be greater than {show(minimum)}")
    _bounds(value.text, result, minimum, maximum)
    return result


def fraction(value: ast.Value) -> float:
    """A share: `5%` or a plain number in [0, 1]."""
    if not isinstance(value, ast.Number):
        raise _wrong("a share such as `5%`", value)
    number, suffix = _decimal(value)
    if suffix == "%":
        number = number / 100
    elif suffix:
        raise ValueProblem("E202", f"`{value.text}` is a count, but a share is needed here", "write a share such as `5%`")
    result = float(number)
    if not 0.0 <= result <= 1.0:
        raise ValueProblem("E202", f"`{value.text}` is outside 0%..100%")
    return result


def is_share(value: ast.Value) -> bool:
    return isinstance(value, ast.Number) and value.text.endswith("%")


def _bounds(text: str, result: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and result < minimum:
        raise ValueProblem("E202", f"`{_clip(text)}` is below the minimum {show(minimum)}")
    if maximum is not None and result > maximum:
        raise ValueProblem("E202", f"`{_clip(text)}` is above the maximum {show(maximum)}")


def string(value: ast.Value) -> str:
    if not isinstance(value, ast.String):
        hint = f"quote it: \"{value.name}\"" if isinstance(value, ast.Name) else None
        raise _wrong("a string", value, hint)
    return value.value


def boolean(value: ast.Value) -> bool:
    if isinstance(value, ast.Name) and value.name in ("true", "false"):
        return value.name == "true"
    raise _wrong("`true` or `false`", value)


def name(value: ast.Value) -> str:
    if not isinstance(value, ast.Name):
        raise _wrong("a name", value)
    return value.name


def names(value: ast.Value) -> list[tuple[str, ast.Name]]:
    """A name or a list of names, each with its node (for reference diagnostics)."""
    if isinstance(value, ast.Name):
        return [(value.name, value)]
    if isinstance(value, ast.ListValue):
        result = []
        for item in value.items:
            if not isinstance(item, ast.Name):
                raise _wrong("a list of names", item)
            result.append((item.name, item))
        return result
    raise _wrong("a name or a list of names", value)


def strings(value: ast.Value) -> list[str]:
    if isinstance(value, ast.String):
        return [value.value]
    if isinstance(value, ast.ListValue):
        return [string(item) for item in value.items]
    raise _wrong("a string or a list of strings", value)


def dims(value: ast.Value) -> tuple[int, int]:
    if not isinstance(value, ast.Dims):
        raise _wrong("a grid such as `2x2`", value)
    if value.first < 1 or value.second < 1:
        raise ValueProblem("E202", f"`{value.text}` must have at least one row and one column")
    if value.first > MAX_GRID or value.second > MAX_GRID:
        raise ValueProblem("E202", f"`{_clip(value.text)}` is larger than any tile grid ({MAX_GRID}x{MAX_GRID} at most)",
                           "LLaVA-OneVision grids go up to 6x6")
    return value.first, value.second


def token_budget(value: ast.Value) -> int:
    """`7290` or `10x729` (ten tiles' worth of 729 tokens)."""
    if isinstance(value, ast.Dims):
        if value.first < 1 or value.second < 1:
            raise ValueProblem("E202", f"`{value.text}` must be positive")
        if value.first * value.second > MAX_NUMBER:
            raise ValueProblem("E202", f"`{_clip(value.text)}` is out of range")
        return value.first * value.second
    return integer(value, minimum=1)
