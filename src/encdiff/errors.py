"""User mistakes: the one exception type, and the checks that raise it naming the field and value at fault.

The CLI prints an EncdiffError as one line and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class EncdiffError(ValueError):
    """A user mistake: the message says which file, key, field or value is wrong."""


class TrainingInterrupted(EncdiffError):
    """A run stopped by SIGINT/SIGTERM after writing its checkpoint: the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint} written: run the same command again "
                         "to resume")


def count(n: int, noun: str, plural: str | None = None) -> str:
    """"1 image", "2 images": every message that counts says it in English."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def lookup(registry, name: str, what: str):
    """registry[name], or an error listing the valid names: one wording for every "unknown X" in encdiff."""
    if name not in registry:
        raise EncdiffError(f"unknown {what} {name!r}; valid: {', '.join(map(str, registry))}")
    return registry[name]


def config_from_dict(config_class: type, values: dict[str, Any], where: str):
    """Build a frozen config dataclass from JSON values; unknown fields are an error, lists become tuples."""
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise EncdiffError(f"{where}: unknown field {unknown[0]!r} for {config_class.__name__} "
                           f"(known: {', '.join(sorted(names))})")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return config_class(**values)
    except EncdiffError as e:
        raise EncdiffError(f"{where}: {e}") from None
    except TypeError as e:
        raise EncdiffError(f"{where}: {e}") from None


def check_field(ok: bool, field: str, value: Any, expected: str) -> None:
    """Config validation: raise an error naming the field, its value and what would be valid."""
    if not ok:
        raise EncdiffError(f"config field {field!r} = {value!r}: expected {expected}")


MAX_SIZE = 65536  # no channel count, image size, layer count or class count of a real model is larger


def check_int(value: Any, field: str, minimum: int = 1, maximum: int | None = None) -> None:
    """An integer >= minimum (and <= maximum: model sizes pass MAX_SIZE, so an absurd size never reaches the
    allocator)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    check_field(ok and (maximum is None or value <= maximum), field, value,
                f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}")


def check_number(value: Any, field: str, *, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    check_field(ok and (value > 0 or not positive), field, value, "a positive finite number" if positive else
                "a finite number")


def check_bool(value: Any, field: str) -> None:
    check_field(isinstance(value, bool), field, value, "true or false")


def check_tuple(value: Any, field: str, length: int | None, item_check) -> None:
    """A list/tuple (of `length` items, if given) whose every item passes `item_check(item) -> bool`."""
    ok = isinstance(value, (tuple, list)) and len(value) > 0 and (length is None or len(value) == length)
    check_field(ok and all(item_check(v) for v in value), field, value,
                f"a list of {length or 'one or more'} {item_check.__doc__}")


def is_positive_int(v: Any) -> bool:
    """positive integers up to 65536"""
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIZE


def is_flag(v: Any) -> bool:
    """true/false values"""
    return isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """finite numbers"""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
