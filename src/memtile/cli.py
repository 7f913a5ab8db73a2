"""`memtile profile|plan|run|tile|train|export|report`: one subcommand per capability."""

import argparse
import importlib
import sys

from memtile.commands import COMMANDS
from memtile.errors import MemtileError


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(argv)
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
