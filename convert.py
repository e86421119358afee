"""Dataset conversion: one command per format, each implemented next to the loader that reads it.

    python convert.py fashion-mnist --out data/fashion-mnist      # embedded default data (ImageFolder)
    python convert.py photos --out data/photos                    # ImageNet-like JPEG folder from real photos
    python convert.py webdataset --src DIR --out DIR --shard-size N   # tar shards for DALI
    python convert.py validate DIR                                # find corrupt / unreadable images
    python convert.py ffcv --src DIR --out FILE.beton             # FFCV .beton

Every command reports counts and bytes, refuses to overwrite non-empty output unless --force, and
writes to a temporary name that is renamed only once complete.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from masksiam.errors import ArgumentParser, exit_on_user_error

# command -> module; the module's COMMANDS[command] = (help, add_arguments(parser), run(args) -> exit code)
COMMANDS = {
    "fashion-mnist": "pipelines.tools.fashion_mnist",
    "photos": "pipelines.tools.photos",
    "webdataset": "pipelines.tools.webdataset",
    "validate": "pipelines.tools.validate",
    "ffcv": "pipelines.tools.ffcv_convert",
}


# the arguments that name an input; a missing one is refused here, for every command alike
INPUTS = ("src", "path")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(prog="convert.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    runners = {}
    for name, module in COMMANDS.items():
        if wanted and name != wanted:
            sub.add_parser(name)  # listed in --help without importing its module
            continue
        help_text, add_arguments, run = importlib.import_module(module).COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        runners[name] = run
    args = parser.parse_args(argv)
    for name in INPUTS:
        value = getattr(args, name, None)
        if value is not None and not Path(value).exists():
            from pipelines.loaders.common import DataError
            raise DataError(f"{args.command}: {value} does not exist")
    return runners[args.command](args) or 0


if __name__ == "__main__":   # main() raises user errors (DataError, ...) to Python callers; here one line
    sys.exit(exit_on_user_error("convert.py", main))
