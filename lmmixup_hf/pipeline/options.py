"""One parser for every command's options, from flags, a ``--config`` YAML or a run config section.

:class:`OptionsParser` is an ``HfArgumentParser`` (as TRL's ``TrlParser``): the flags come from the
options dataclass, ``Literal`` fields show their choices. Whatever the source, the values end in
:func:`lmmixup_hf.options.from_mapping`, so equal input builds equal objects and a bad value is
refused the same way, naming what the user wrote (``--mode``, ``x.yaml: rate.mode``) and what is
allowed. The checks themselves are declared on the fields (:mod:`lmmixup_hf.options`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from transformers import HfArgumentParser

from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.options import OWN_METADATA, Namer, OptionError, choices, from_mapping, hints, suggest


class OptionsParser(HfArgumentParser):
    """Flags and YAML into one options dataclass (``cls``), checked the same way."""

    def __init__(self, cls: type, prog: str | None = None, description: str | None = None):
        self.cls = cls
        self.own_config = "config" in {f.name for f in dataclasses.fields(cls)}
        super().__init__(cls, prog=prog, description=description)
        if not self.own_config:  # a command whose own option is `config` (``lmmixup run``) reads it itself
            self.add_argument("--config", default=None, help="YAML file whose keys are this command's flags")
        for action in self._actions:
            if action.required:  # it may come from the YAML instead: from_mapping checks it
                action.required, action.default = False, argparse.SUPPRESS
                action.help = f"{action.help or ''} Required.".strip()
            if any(o.startswith("--no_") for o in action.option_strings):  # the generated complement of a bool
                action.help, action.default = f"Same as --{action.dest} false.", argparse.SUPPRESS
            elif action.help:  # argparse %-formats help: a literal "30%" must not crash --help
                action.help = re.sub(r"%(?!\()", "%%", action.help)

    def _add_dataclass_arguments(self, dtype: type) -> None:
        """HfArgumentParser's, on copies of the fields: required options first in ``--help``, our own
        metadata kept from argparse, and choices checked by the class (so every source gets the same
        message, with a suggestion) while ``--help`` still lists them."""
        fields = [f for f in dataclasses.fields(dtype) if f.init]
        for f in sorted(fields, key=lambda f: not (f.default is f.default_factory is dataclasses.MISSING)):
            f = copy.copy(f)
            f.type = hints(dtype)[f.name]
            f.metadata = types.MappingProxyType({k: v for k, v in f.metadata.items() if k not in OWN_METADATA})
            allowed = choices(f.type)
            self._parse_dataclass_field(self, f)
            if allowed is not None:
                action, listed = self._actions[-1], ",".join(map(str, allowed))
                action.choices = None
                if len(listed) <= 40:
                    action.metavar = "{" + listed + "}"
                else:  # a long list once in the help, not in every spelling of the flag
                    action.metavar, action.help = (
                        f.name.upper(),
                        f"{action.help or ''} One of: {listed.replace(',', ', ')}.".strip(),
                    )

    def error(self, message: str) -> NoReturn:
        """A usage error as one line (exit 2), with the closest flag for an unknown one."""
        unknown = re.match(r"unrecognized arguments: (--?[\w-]+)", message)
        if unknown:
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            message += suggest(unknown[1], flags)
        raise LmmixupError(f"{message} (see {self.prog} --help)")

    def parse_flags(self, argv: list[str]) -> Any:
        """Flags, over the ``--config`` YAML's keys (the same names), over the defaults."""
        unset = object()  # a namespace that already holds every option keeps argparse's defaults out
        ns = argparse.Namespace(**{a.dest: unset for a in self._actions if a.dest != "help"})
        given = {k: v for k, v in vars(self.parse_args(argv, namespace=ns)).items() if v is not unset}
        config = None if self.own_config else given.pop("config", None)
        values = dict(read_config(config)) if config else {}
        from_yaml = set(values)
        values.update(given)
        from_yaml -= set(given)
        return from_mapping(
            self.cls, values, lambda key: f"{config}: {key}" if key in from_yaml else f"--{key}", what=f"`{self.prog}`"
        )

    def parse_dict(self, values: Mapping[str, Any], where: Namer | str = "", what: str = "") -> Any:  # type: ignore[override]
        """A mapping (a YAML section) into the dataclass; errors name the key as ``where`` says (a
        prefix such as ``"x.yaml: rate."`` or a function of the key)."""
        return from_mapping(self.cls, values, where, what=what)


def read_config(path: str) -> dict[str, Any]:
    """A command's ``--config`` YAML: a mapping of option names to values."""
    values = read_yaml_config(path)
    if not isinstance(values, dict):
        raise LmmixupError(f"{path}: expected a mapping of option names to values")
    return values


def read_yaml_config(path: str) -> Any:
    """A YAML file's content, or one clear error saying why it cannot be read."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise LmmixupError(f"--config {path}: no such file")
    if p.is_dir():
        raise LmmixupError(f"--config {path}: is a folder, not a YAML file")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise LmmixupError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise LmmixupError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise LmmixupError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None


__all__ = ["OptionError", "OptionsParser", "read_config", "read_yaml_config"]
