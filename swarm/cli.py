"""`swarm`: the command line (status of the swarm on the LAN, standalone seed and fetch for demos).

Subcommands are added by the modules that implement them; this module only parses and dispatches.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm",
        description="vllm-swarm: BitTorrent-style weight distribution between inference instances.",
    )
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
