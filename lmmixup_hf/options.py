"""Typed options: every option declares, on its own field, what values it takes.

An options dataclass (a stage's ``XArgs``, a core's options, the ``ray:`` section) subclasses
:class:`Options`; its ``__post_init__`` checks every field against its declaration, so a bad value
fails where the object is built — from flags, a YAML section or Python — before any work starts:

- **choices** are the field's type: ``mode: Literal["sync", "batch"] = "sync"`` (``HfArgumentParser``
  shows them in ``--help``);
- **ranges** are field metadata in interval notation: ``metadata={"range": "[0, 1]"}``,
  ``"(0, inf)"``, ``"[1, inf)"``;
- **fingerprint** says whether the option changes what a stage produces: ``False`` for operational
  options (devices, batch sizes, concurrency, caches...), which never invalidate finished work;
  ``"non-default"`` for an option added after runs existed, hashed only when it is not at its
  default so that those runs stay up to date. The stage bookkeeping reads the mark
  (:func:`fingerprint_params`).

Combinations (``sim_floor`` only with drawn sizes, ...) are checked in the class's own
``__post_init__``, after ``super().__post_init__()``. Every failure is an :class:`OptionError` (a
``ValueError``) that names the option, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from lmmixup_hf.data.schema import TASK_TYPES, LmmixupError, normalize_task_type

RANGE = "range"
FINGERPRINT = "fingerprint"
NON_DEFAULT = "non-default"
# metadata keys of ours, which argparse must not see
OWN_METADATA = (RANGE, FINGERPRINT)

_NO_VALUE = object()


class OptionError(LmmixupError, ValueError):
    """A bad option value: names the option (``--mode``, ``x.yaml: rate.mode`` or ``mode``)."""

    def __init__(self, key: str, detail: str, value: Any = _NO_VALUE):
        self.key, self.detail, self.value = key, detail, value
        super().__init__(f"{key}: {detail}" if value is _NO_VALUE else f"{key} {value!r}: {detail}")


def suggest(word: Any, candidates: Iterable[Any]) -> str:
    """`` (did you mean 'batch'?)`` for the closest candidate, or nothing."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- declarations ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Range:
    """A closed or half-open interval, written as in mathematics: ``[0, 1]``, ``(0, inf)``."""

    text: str
    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    @functools.cache
    def parse(cls, text: str) -> Range:
        m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*", text)
        if not m:
            raise ValueError(f"not an interval: {text!r} (write e.g. '[0, 1]' or '(0, inf)')")
        return cls(text.strip(), float(m[2]), float(m[3]), m[1] == "(", m[4] == ")")

    def holds(self, v: float) -> bool:
        if math.isnan(v):
            return False
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def describe(self) -> str:
        if math.isinf(self.high):
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {self.text}"


def choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) annotation allows, else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def literal_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    """The choice fields of an options class: ``{name: allowed values}``."""
    found = {f.name: choices(hints(cls)[f.name]) for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in found.items() if v is not None}


def is_operational(f: dataclasses.Field) -> bool:
    return f.metadata.get(FINGERPRINT, True) is False


def operational(cls: type) -> tuple[str, ...]:
    """The fields marked ``fingerprint: False``: they never invalidate a finished stage."""
    return tuple(f.name for f in dataclasses.fields(cls) if is_operational(f))


def fingerprint_params(options: Any) -> dict[str, Any]:
    """The options that decide what a stage produces (see the module docstring for the marks)."""
    out = {}
    for f in dataclasses.fields(options):
        mark, value = f.metadata.get(FINGERPRINT, True), getattr(options, f.name)
        if mark is False or (mark == NON_DEFAULT and value == f.default):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and _is_float(hints(type(options))[f.name]):
            value = float(value)  # mean_cap=3 from Python and 3.0 from a flag are one value
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


# -- checking -------------------------------------------------------------------------------------
def check_fields(obj: Any) -> None:
    """Every field of ``obj`` against its choices and range; the first bad one raises."""
    types_ = hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        allowed = choices(types_[f.name])
        if allowed is not None and value is not None and value not in allowed:
            listed = ", ".join(map(str, allowed))
            raise OptionError(f.name, f"expected one of {listed}{suggest(value, allowed)}", value)
        spec = f.metadata.get(RANGE)
        if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
            bound = Range.parse(spec)
            if not bound.holds(value):
                raise OptionError(f.name, f"expected a value {bound.describe()}", value)


def check_order(obj: Any, small: str, large: str) -> None:
    """``small`` may not exceed ``large`` (e.g. min_size and max_size)."""
    a, b = getattr(obj, small), getattr(obj, large)
    if a is not None and b is not None and a > b:
        raise OptionError(small, f"is larger than {large} {b!r}", a)


class Options:
    """Base of the options dataclasses: building one checks it (see the module docstring)."""

    def __post_init__(self) -> None:
        check_fields(self)


def check_task_type(obj: Any, key: str = "task_type") -> None:
    """A task type option (aliases such as ``qa_mixup`` allowed) names one of :data:`TASK_TYPES`."""
    value = getattr(obj, key)
    if value is not None:
        try:
            normalize_task_type(value)
        except ValueError:
            raise OptionError(
                key, f"expected one of {', '.join(TASK_TYPES)}{suggest(value, TASK_TYPES)}", value
            ) from None


def resolve(cls: type, options: Any = None, changes: Mapping[str, Any] | None = None) -> Any:
    """A core's options: ``options`` (an instance of ``cls`` or of a subclass, default the defaults)
    with some of them ``changes``-d by keyword, checked; ``core(ds, max_size=5)`` reads well."""
    if isinstance(options, cls) and type(options) is cls and not changes:
        return options
    base = {f.name: getattr(options, f.name) for f in dataclasses.fields(cls) if f.init} if options is not None else {}
    return from_mapping(cls, {**base, **(changes or {})})


# -- building from a mapping (a YAML section, parsed flags, keyword arguments) ---------------------
Namer = Callable[[str], str]


def from_mapping(cls: type, values: Mapping[str, Any], name: Namer | str = "", *, what: str = "") -> Any:
    """``cls(**values)``, checked: unknown keys (with the closest known one), types, missing required
    options, then the class's own checks. ``name`` turns a key into what the user wrote: a prefix
    (``"x.yaml: rate."``, ``"--"``) or a function. Nested options classes take nested mappings."""
    namer: Namer = name if callable(name) else (lambda key, prefix=name: f"{prefix}{key}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    types_ = hints(cls)
    for key in values:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise OptionError(
                namer(key), f"unknown option{what and ' for ' + what}{suggest(key, fields)}; known options: {known}"
            )
    kwargs = {}
    for key, value in values.items():
        annotation = types_[key]
        nested = _options_class(annotation)
        if nested is not None and isinstance(value, Mapping):
            value = from_mapping(nested, value, lambda k, key=key: namer(f"{key}.{k}"))
        elif nested is not None and value is not None and not isinstance(value, nested):
            names = ", ".join(f.name for f in dataclasses.fields(nested))
            raise OptionError(namer(key), f"expected a mapping of {names}, got {type(value).__name__} {value!r}")
        elif not matches(value, annotation):
            raise OptionError(namer(key), f"expected {_shown(annotation)}, got {type(value).__name__} {value!r}")
        elif _is_float(annotation) and isinstance(value, int):
            value = float(value)  # YAML's 1 and the flag's 1.0 are one value (and one fingerprint)
        kwargs[key] = value
    missing = [n for n, f in fields.items() if _required(f) and n not in kwargs]
    if missing:
        raise OptionError(", ".join(namer(m) for m in missing), "missing (required)")
    try:
        return cls(**kwargs)
    except OptionError as e:  # named as the user wrote it, with the value as written (1, not 1.0)
        value = values.get(e.key, e.value) if e.value is not _NO_VALUE else e.value
        raise OptionError(namer(e.key), e.detail, value) from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _options_class(annotation: Any) -> type | None:
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    for tp in (annotation, *args):
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return tp
    return None


def _is_float(annotation: Any) -> bool:
    if annotation is float:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and float in typing.get_args(annotation)


def _shown(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def matches(value: Any, tp: Any) -> bool:
    """Whether a YAML value fits an annotation (ints are floats, bools are not numbers)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(matches(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return isinstance(value, (str, int, float, bool))  # which of them: the class's own check says
    if tp is type(None):
        return value is None
    if origin in (list, tuple, typing.Sequence):
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and (not args or all(matches(v, args[0]) for v in value))
    if origin in (dict, typing.Mapping):
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation we do not model: let the class check it
