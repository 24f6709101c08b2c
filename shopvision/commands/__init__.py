"""One module per sub-command. Each defines ORDER (its place in `--help`) and add_parser(steps).

The CLI discovers the modules here, so adding a step means adding a file, not editing a shared list.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_step(steps, name: str, help_text: str, run) -> argparse.ArgumentParser:
    """A sub-command whose parsed arguments go to `run(args)`."""
    sub = steps.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(run=run)
    return sub


def add_root_flag(parser: argparse.ArgumentParser) -> None:
    """--root NAME=DIR: where the photos a data step's manifest references lie on this machine."""
    parser.add_argument(
        "--root",
        dest="roots",
        action="append",
        metavar="NAME=DIR",
        help="where the photos under root NAME of a manifest lie here, e.g. cleaned=/data/cleaned "
        "(default: where they were when it was written); repeatable",
    )
