"""`moshi-mlx bench SUBJECT`: speed and memory tables, measured side by side with the
reference implementations that are installed. One module per subject (mimi, lm, chat,
asr, tts, convert, serve); each measurement runs in its own worker process (common.run_job)."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

SUBJECTS = {
    "mimi": "Mimi batch and streaming encode/decode vs moshi (PyTorch), transformers, rustymimi",
    "lm": "one Moshi LM step: moshi_mlx fp32/q8/q4 vs moshi (PyTorch) fp32/bf16, and 7B q4",
    "chat": "the duplex loop (DuplexSession) frame by frame",
    "asr": "speech-to-text (SpeechToText) in Kyutai's STT shapes vs moshi (PyTorch), live and batched",
    "tts": "text-to-speech (TextToSpeech) in tts-1.6b's shape vs moshi (PyTorch): real-time factor, first audio",
    "convert": "converting a synthetic 7B release to q4 and q8",
    "serve": "what `moshi-mlx serve`'s websocket + Opus path adds per frame vs file-mode chat (loopback)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks printed as tables (mimi, lm, chat, asr, tts, convert, serve)",
                       description="Speed and memory benchmarks, measured side by side with the "
                                   "reference implementations that are installed. Subjects: "
                                   + "; ".join(f"{k}: {v}" for k, v in SUBJECTS.items()))
    p.add_argument("subject", choices=list(SUBJECTS), help="what to benchmark")
    p.add_argument("--audio", type=Path, default=None,
                   help="mimi, asr: audio file to use (default: synthetic speech-like sound)")
    p.add_argument("--seconds", type=float, default=10.0, help="mimi, asr: clip length; tts: audio to generate (default 10)")
    p.add_argument("--only", default=None,
                   help="mimi: comma-separated subset of moshi_mlx,moshi-torch,transformers,rustymimi")
    p.add_argument("--num-quantizers", type=int, default=8, help="mimi: codebooks (default 8, as Moshi)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--steps", type=int, default=20,
                   help="lm: timed steps per row (after 3 warm-up steps); chat, serve: frames (at least 50)")
    p.add_argument("--no-7b", action="store_true", help="lm: skip the full 7B q4 row; asr: skip the 2.6B shape (they take minutes)")
    p.add_argument("--stt", action="store_true", help="serve: the STT websocket with 1, 4 and 8 clients")
    p.add_argument("--tts", action="store_true", help="serve: the TTS websocket's time to first audio")
    p.add_argument("--torch-device", choices=("cpu", "cuda"), default="cpu",
                   help="asr, tts: where the PyTorch rows run (default cpu; cuda on a machine with an NVIDIA GPU)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moshi_mlx.errors import InputError

    if args.only is not None and args.subject != "mimi":
        raise InputError("--only applies to `bench mimi`")
    if (args.stt or args.tts) and args.subject != "serve":
        raise InputError("--stt and --tts apply to `bench serve`")
    if args.torch_device != "cpu" and args.subject not in ("asr", "tts"):
        raise InputError("--torch-device applies to `bench asr` and `bench tts`")
    return importlib.import_module(f"{__name__}.{args.subject}").run(args)
