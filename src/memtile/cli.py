"""`memtile profile|plan|run|tile|train|export|report`: one subcommand per capability."""

import argparse
import importlib
import sys

from memtile.commands import COMMANDS
from memtile.errors import MemtileError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (with where to look), not the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = _Parser(
        prog="memtile", description="Make CNNs fit in less memory, measured."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"memtile.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"memtile.commands.{name}":
                raise
            continue
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as usage:  # argparse printed its one-line error (or --help)
        return usage.code if isinstance(usage.code, int) else 2
    try:
        return modules[args.command].run(args)
    except MemtileError as error:
        print(f"memtile {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memtile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
