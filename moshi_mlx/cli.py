"""`moshi-mlx <subcommand>`: the one command line entry point.

Each app module registers its subcommand with `add_parser(subparsers)` and runs it with
`run(args)`. Errors users can fix are printed as one line (exit status 2), never as a
traceback from inside MLX.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand → (module that implements it, one-line help). The top-level parser is built
# from this table alone and only the chosen subcommand's module is imported: `moshi-mlx
# --help` and `moshi-mlx SUB --help` never import MLX (convert imports it at load time).
SUBCOMMANDS = {
    "encode": ("moshi_mlx.apps.codec", "audio file (wav/flac/ogg/mp3) → Mimi codes (.safetensors)"),
    "decode": ("moshi_mlx.apps.codec", "Mimi codes (.safetensors) → audio file (wav/flac/ogg/mp3)"),
    "bench": ("moshi_mlx.apps.bench", "speed and memory benchmarks, printed as tables"),
    "convert": ("moshi_mlx.convert.convert", "PyTorch/transformers Moshi checkpoint (+ LoRA) → (quantized) MLX "
                                             "directory"),
    "chat": ("moshi_mlx.apps.chat", "talk with Moshi: microphone and speakers, or a recording"),
    "transcribe": ("moshi_mlx.apps.transcribe", "speech to text (Kyutai STT): audio files or the microphone"),
    "tts": ("moshi_mlx.apps.tts", "text to speech (Kyutai TTS): text or dialogs → audio, word timings"),
    "serve": ("moshi_mlx.apps.serve", "talk to Moshi in the browser; STT/TTS services for voice agents"),
}


class _Parser(argparse.ArgumentParser):
    """argparse's errors in the CLI's one-line form (argparse prints a usage block first);
    subcommand parsers inherit it (add_subparsers uses the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: the chosen subcommand's full parser, the others as names + help."""
    parser = _Parser(prog="moshi-mlx", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="print backend, BLAS and timing details")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    chosen = _chosen_subcommand(sys.argv[1:] if argv is None else argv)
    for name, (module, help_text) in SUBCOMMANDS.items():
        if name in sub.choices:
            continue  # registered by its module with a sibling (encode/decode)
        if chosen is not None and module == SUBCOMMANDS[chosen][0]:
            importlib.import_module(module).add_parser(sub)
        else:  # never parsed: argv names another subcommand, or none (usage/--help)
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _chosen_subcommand(argv: list[str]) -> str | None:
    # The global options take no values, so the first word that is not an option is the
    # subcommand (argparse reports an unknown one, listing the valid ones).
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in SUBCOMMANDS else None


def _version() -> str:
    from . import __version__

    return f"moshi-mlx {__version__}"


def main(argv: list[str] | None = None) -> int:
    import moshi_mlx  # noqa: F401 - the optimized BLAS must load before mlx.core
    from .cpu.blas import STATUS
    from .errors import MoshiMlxError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    if args.verbose:
        import mlx.core as mx

        from .cpu import kernels as cpu

        print(f"mlx {mx.__version__}, device {mx.default_device()}; {STATUS.reason}; {cpu.describe()}",
              file=sys.stderr)
    try:
        return int(args.run(args) or 0)
    except MoshiMlxError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line, even for wrapped messages
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
