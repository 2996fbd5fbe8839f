"""``lmmixup``: one command per stage, arguments from dataclasses, flags or a YAML ``--config``.

Each subcommand lives in its own module as an arguments dataclass plus a function; the registry
below names them as strings so that ``lmmixup --help`` stays fast (no torch import).

Exit statuses (also in the README):

====  =======================================================================================
0     done: every row is accounted for (in the output or quarantined with a reason)
1     failed for a reason outside the input: I/O, network, an unexpected error
2     usage or input error (a bad flag, config, value or file): one line says which
3     finished, but partially: rows were left failed (e.g. the judge failed on them) or an
      input stage was itself partial; rerunning the same command retries what is missing
130   interrupted (Ctrl-C); rerunning the same command resumes
====  =======================================================================================
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

from lmmixup_hf.data.schema import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, LmmixupError
from lmmixup_hf.pipeline.registry import STAGES


@dataclasses.dataclass(frozen=True)
class Command:
    module: str
    args: str  # the arguments dataclass in ``module``
    func: str  # ``func(args)``; a returned path or URL is printed
    help: str


COMMANDS: dict[str, Command] = {
    **{s.name: Command(s.module, s.args, s.func, s.help) for s in STAGES if s.name != "rerate"},
    "run": Command("lmmixup_hf.pipeline.run", "RunArgs", "run", "Run the whole pipeline from a YAML config."),
    "build-quality-library": Command(
        "lmmixup_hf.pipeline.build_library",
        "LibraryArgs",
        "build_quality_library",
        "Build the Bayes quality library for rewards.",
    ),
    "push": Command(
        "lmmixup_hf.integrations.hub", "PushArgs", "push", "Upload a model or stage folder (with its card) to the Hub."
    ),
    "pull": Command(
        "lmmixup_hf.integrations.hub", "PullArgs", "pull", "Download a model or dataset repo from the Hub."
    ),
    "mixture export": Command(
        "lmmixup_hf.integrations.mixture_export",
        "MixtureExportArgs",
        "export",
        "Write MIXTURE as parquet + a dataset card.",
    ),
    "mixture card": Command(
        "lmmixup_hf.integrations.mixture_export",
        "MixtureCardArgs",
        "write_card",
        "Write the MIXTURE dataset card only.",
    ),
    "judge-report": Command(
        "lmmixup_hf.pipeline.judge_report",
        "JudgeReportArgs",
        "judge_report",
        "How far two ratings of the same rows agree (kappa, confusion, length bias).",
    ),
    "eval-report": Command("lmmixup_hf.evaluation.report", "EvalReportArgs", "eval_report", "Paper-style eval table."),
}


def parse_dataclass(cls: type, argv: list[str], prog: str, description: str) -> Any:
    """Parse ``argv`` into ``cls``; ``--config file.yaml`` supplies values that flags override."""
    from lmmixup_hf.pipeline.options import OptionsParser

    return OptionsParser(cls, prog=prog, description=description).parse_flags(argv)


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: lmmixup <command> [options]   (lmmixup <command> --help for its options;",
        "       flags take - or _: --judge-model = --judge_model)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lmmixup_hf import __version__

        print(f"lmmixup-hf {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if rest and f"{name} {rest[0]}" in COMMANDS:  # a command group: `lmmixup mixture export ...`
        name, rest = f"{name} {rest[0]}", rest[1:]
    elif name not in COMMANDS and any(c.startswith(name + " ") for c in COMMANDS):
        group = {c: cmd for c, cmd in COMMANDS.items() if c.startswith(name + " ")}
        asked = not rest or rest[0] in ("-h", "--help")
        print(
            "\n".join(
                [f"usage: lmmixup {name} {{{','.join(c.split()[1] for c in group)}}} [options]", ""]
                + [f"  {c}  {cmd.help}" for c, cmd in group.items()]
            ),
            file=sys.stdout if asked else sys.stderr,
        )
        return EXIT_OK if asked else EXIT_USAGE
    if name not in COMMANDS:
        print(f"lmmixup: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cmd = COMMANDS[name]
    args = None
    try:
        module = importlib.import_module(cmd.module)
        args = parse_dataclass(getattr(module, cmd.args), rest, f"lmmixup {name}", cmd.help)
        result = getattr(module, cmd.func)(args)
    except LmmixupError as e:
        print(f"lmmixup {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\nlmmixup {name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # a disk or network problem: one line, not a traceback
        from lmmixup_hf.pipeline.workflow import DISK_FULL

        path = getattr(e, "filename", None)
        if not path and e.errno in DISK_FULL:  # a writer that does not say where (pyarrow): the output folder
            path = getattr(args, "out", None) or getattr(args, "out_dir", None)
        where = f": {path}" if path else ""
        print(f"lmmixup {name}: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(result, int):
        return result
    if isinstance(result, (str, Path)):  # a written file, folder or URL: what the user asked for
        print(result)
    out = getattr(args, "out", None)
    return _partial_status(name, out) if out else EXIT_OK


def _partial_status(name: str, out: str) -> int:
    """EXIT_PARTIAL, with one line saying what is missing, when the stage's manifest says so."""
    from lmmixup_hf.pipeline.workflow import input_status

    why = input_status(out)
    if why is None:
        return EXIT_OK
    print(f"lmmixup {name}: partial: {why} ({out}); rerun to retry what is missing", file=sys.stderr)
    return EXIT_PARTIAL


if __name__ == "__main__":
    sys.exit(main())
