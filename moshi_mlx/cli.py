"""`moshi-mlx <subcommand>`: the one command line entry point.

Each app module registers its subcommand with `add_parser(subparsers)` and runs it with
`run(args)`. Errors users can fix are printed as one line (exit status 2), never as a
traceback from inside MLX.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand → module that implements it (imported lazily: `moshi-mlx --help` stays fast).
SUBCOMMANDS = {
    "encode": "moshi_mlx.apps.codec",
    "decode": "moshi_mlx.apps.codec",
    "bench": "moshi_mlx.apps.bench",
    "convert": "moshi_mlx.convert.convert",
    "chat": "moshi_mlx.apps.chat",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moshi-mlx", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="print backend, BLAS and timing details")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    seen = set()
    for name, module in SUBCOMMANDS.items():
        if module not in seen:
            importlib.import_module(module).add_parser(sub)
            seen.add(module)
    return parser


def _version() -> str:
    from . import __version__

    return f"moshi-mlx {__version__}"


def main(argv: list[str] | None = None) -> int:
    import moshi_mlx  # noqa: F401 - the optimized BLAS must load before mlx.core
    from ._blas import STATUS
    from .errors import MoshiMlxError

    args = build_parser().parse_args(argv)
    if args.verbose:
        import mlx.core as mx

        from .kernels import cpu_kernels

        kernels = "on" if cpu_kernels() is not None else "off (not built, no AVX2/FMA, or MOSHI_MLX_CPU_KERNELS=0)"
        print(f"mlx {mx.__version__}, device {mx.default_device()}; {STATUS.reason}; "
              f"CPU kernels (quantized matmul, int8-KV attention, SEANet convolutions) {kernels}", file=sys.stderr)
    try:
        return int(args.run(args) or 0)
    except MoshiMlxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
