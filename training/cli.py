"""Shared CLI plumbing: `--config FILE.toml` gives defaults, flags override them, bad input exits non-zero."""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv; keys of the TOML file named by --config become defaults (unknown keys are an error)."""
    parser.add_argument("--config", type=Path, help="TOML file of defaults (keys are the long flag names)")
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config", type=Path)
    pre, _ = pre_parser.parse_known_args(argv)
    if pre.config is not None:
        if not pre.config.is_file():
            parser.error(f"--config {pre.config}: no such file")
        try:
            values = tomllib.loads(pre.config.read_text())
        except tomllib.TOMLDecodeError as e:
            parser.error(f"--config {pre.config}: not valid TOML ({e})")
        known = {a.dest for a in parser._actions}
        bad = sorted(k for k in values if k.replace("-", "_") not in known)
        if bad:
            parser.error(f"--config {pre.config}: unknown key(s) {', '.join(bad)}")
        defaults = {k.replace("-", "_"): v for k, v in values.items()}
        parser.set_defaults(**defaults)
        for action in parser._actions:  # a required flag given by the file is no longer required on the line
            if action.dest in defaults:
                action.required = False
    return parser.parse_args(argv)


def run_cli(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> None:
    """Run `main(args)`; expected failures (bad paths, bad checkpoints) become one line and exit 2."""
    args = parse_with_config(parser, argv)
    try:
        main(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
