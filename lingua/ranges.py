"""Range specs of config fields: parsing a spec ("any", ">= 1 or -1", "[0, 1)"), collecting a config
class's `RANGES` and wording a range in messages. `lingua.args` checks resolved configs against
them; `lingua.config_help` prints them in `--help`.
"""

from __future__ import annotations

import math
import re
from typing import Callable

# A spec is "any", or alternatives joined by " or ", each a bound (">= 1", "> 0", "< 1"),
# an interval ("[0, 1)", "(0, 1]") or one exact number ("-1", a sentinel such as "take it from
# the tokenizer"). NaN is outside every range but "any".

RANGES_ATTR = "RANGES"
ANY_RANGE = "any"
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda x, b: x >= b, ">": lambda x, b: x > b, "<=": lambda x, b: x <= b, "<": lambda x, b: x < b,
}


def _number(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"range {spec!r}: {text!r} is not a number") from None


def _alternative(text: str, spec: str) -> Callable[[float], bool]:
    if bound := _BOUND.match(text):
        compare, limit = _COMPARE[bound.group(1)], _number(bound.group(2), spec)
        return lambda x: compare(x, limit)
    if interval := _INTERVAL.match(text):
        low, high = _number(interval.group(2), spec), _number(interval.group(3), spec)
        above = _COMPARE[">=" if interval.group(1) == "[" else ">"]
        below = _COMPARE["<=" if interval.group(4) == "]" else "<"]
        return lambda x: above(x, low) and below(x, high)
    exact = _number(text, spec)
    return lambda x: x == exact


def parse_range(spec: str) -> Callable[[float], bool]:
    """The membership test of a range spec; ValueError for a malformed spec."""
    if spec.strip() == ANY_RANGE:
        return lambda x: True
    tests = [_alternative(part.strip(), spec) for part in spec.split(" or ")]
    return lambda x: not math.isnan(x) and any(test(x) for test in tests)


def ranges_of(cls: type) -> dict[str, str]:
    """field name -> range spec of a config class, its dataclass bases' `RANGES` included."""
    ranges: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        ranges.update(vars(klass).get(RANGES_ATTR, {}))
    return ranges


def range_text(spec: str) -> str:
    """How a message words a range: "in [0, 1)", ">= 1 or -1"."""
    return f"in {spec}" if spec[:1] in "[(" else spec
