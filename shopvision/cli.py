"""`shopvision <step>`: a thin command line over the step functions in shopvision.components.

Each sub-command (a module in shopvision.commands) parses flags, calls one step function and prints
its summary. Bad input raises StepError in the step and is printed here as one line with exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from shopvision import __version__, commands
from shopvision.components.errors import StepError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shopvision", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"shopvision {__version__}")
    steps = parser.add_subparsers(dest="command", required=True, metavar="STEP")
    modules = [
        importlib.import_module(f"{commands.__name__}.{info.name}")
        for info in pkgutil.iter_modules(commands.__path__)
    ]
    for module in sorted(modules, key=lambda m: (m.ORDER, m.__name__)):
        module.add_parser(steps)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw_argv)
    args.raw_argv = raw_argv  # a launcher (train) hands the same arguments to its workers
    try:
        args.run(args)
    except StepError as exc:
        print(f"shopvision {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shopvision {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
