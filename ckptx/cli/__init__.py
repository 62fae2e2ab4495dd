"""The `ckptx` command line: `app` parses and dispatches, one module per subcommand presents its result; the engine
lives in the layers below. `main(argv=None) -> int` owns output and exit codes."""

from ckptx.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
