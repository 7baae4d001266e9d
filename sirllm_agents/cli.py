"""The ``sirllm-agents`` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sirllm-agents", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="a 60+ turn conversation on a small cache, SirLLM against StreamingLLM")
    demo.add_argument("--turns", type=int, default=62)
    demo.add_argument("--cache-size", type=int, default=256)
    demo.add_argument("--model", default=None, help="model folder, hub id or .gguf file (default: embedded SmolLM2)")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(turns=args.turns, cache_size=args.cache_size, model=args.model)


if __name__ == "__main__":
    main()
