"""``torchao-mobie`` command line: demo, zoo, quantize, eval, bench (one module per subcommand group).

Errors a user can fix (a bad argument, a missing file, a corrupted checkpoint, a model this backend
does not support) print ``error: ...`` and exit with status 2, as argparse does for bad options; ``-v``
shows the traceback instead. Nothing the user had is modified by a failing command: ``quantize`` writes
into a temporary directory beside ``--out`` and swaps it in only once the checkpoint is complete.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import bench, demo, evaluate, quantize
from .common import REPORT_NAME, CLIError, make_config

__all__ = ["CLIError", "REPORT_NAME", "build_parser", "main", "make_config"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="torchao-mobie", description="1-bit quantization of MoE LLM experts (MoBiE).")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every step; show tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)  # -v after the command name too
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log every step; show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True)
    demo.add_parsers(sub)
    quantize.add_parser(sub, common)
    evaluate.add_parser(sub, common)
    bench.add_parser(sub, common)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.fn(args)
    except Exception as e:
        if verbose:
            raise
        print(f"error: {str(e) or type(e).__name__}", file=sys.stderr)
        for note in getattr(e, "__notes__", ()):
            print(f"  {note}", file=sys.stderr)
        if not isinstance(e, CLIError):
            print("(run with -v for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
