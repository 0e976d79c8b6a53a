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


def check_field(ok: bool, field: str, value: Any, expected: str, what: str = "config field") -> None:
    """Raise an error naming what is at fault, its value and what would be valid. `what` says what kind of thing
    `field` is ("config field", "option", "sampler state field"); empty: `field` is named as it stands."""
    if not ok:
        name = f"{what} {field!r}" if what else field
        raise EncdiffError(f"{name} = {value!r}: expected {expected}")


MAX_SIZE = 65536  # no channel count, image size, layer count or class count of a real model is larger


def check_int(value: Any, field: str, minimum: int = 1, maximum: int | None = None, *, optional: bool = False,
              what: str = "config field", note: str = "") -> None:
    """An integer >= minimum (and <= maximum: model sizes pass MAX_SIZE, so an absurd size never reaches the
    allocator); with `optional`, None too. `note` says in brackets what the bound means."""
    if value is None and optional:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
    check_field(ok and (maximum is None or value <= maximum), field, value,
                expected + (" or null" if optional else "") + (f" ({note})" if note else ""), what)


def check_number(value: Any, field: str, *, positive: bool = False, minimum: float | None = None,
                 maximum: float | None = None, below: float | None = None, optional: bool = False,
                 what: str = "config field", note: str = "") -> None:
    """A finite number: > 0 with `positive`, >= `minimum`, <= `maximum`, < `below`; with `optional`, None too."""
    if value is None and optional:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 or not positive) and (minimum is None or value >= minimum)
          and (maximum is None or value <= maximum) and (below is None or value < below))
    bounds = [b for b in ("> 0" if positive else None, None if minimum is None else f">= {minimum:g}",
                          None if maximum is None else f"<= {maximum:g}", None if below is None else f"< {below:g}")
              if b]
    expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    check_field(ok, field, value, expected + (" or null" if optional else "") + (f" ({note})" if note else ""), what)


def check_bool(value: Any, field: str, *, optional: bool = False, what: str = "config field") -> None:
    check_field(isinstance(value, bool) or (optional and value is None), field, value,
                "true, false or null" if optional else "true or false", what)


def check_choice(value: Any, field: str, valid, what: str = "config field") -> None:
    """One of the values of `valid` (a registry's keys or a tuple): the one wording for a closed set of names."""
    check_field(value in valid, field, value, f"one of {', '.join(map(str, valid))}", what)


def check_tuple(value: Any, field: str, length: int | None, item_check, what: str = "config field") -> None:
    """A list/tuple (of `length` items, if given) whose every item passes `item_check(item) -> bool`."""
    ok = isinstance(value, (tuple, list)) and len(value) > 0 and (length is None or len(value) == length)
    check_field(ok and all(item_check(v) for v in value), field, value,
                f"a list of {length or 'one or more'} {item_check.__doc__}", what)


def is_positive_int(v: Any) -> bool:
    """positive integers up to 65536"""
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIZE


def is_flag(v: Any) -> bool:
    """true/false values"""
    return isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """finite numbers"""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
