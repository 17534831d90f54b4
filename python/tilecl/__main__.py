"""Command line: ``python -m tilecl demo``."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tilecl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a two-tower model on digits halves; memory vs naive")
    demo.add_argument("--epochs", type=int, default=150)
    demo.add_argument("--batch-size", type=int, default=256)
    demo.add_argument("--memory-n", type=int, default=16384, help="batch size of the memory comparison")
    demo.add_argument("--memory-d", type=int, default=128)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.epochs, args.batch_size, args.memory_n, args.memory_d)


if __name__ == "__main__":
    main()
