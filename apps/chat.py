"""`moshi-mlx chat`: full-duplex conversation with Moshi.

This version runs the duplex loop over a recording (`--input-file IN.wav --output-file
OUT.wav`): the same per-frame pipeline the live mode will drive from a microphone, at full
speed, with Moshi's words printed as they are generated.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "kyutai/moshiko-mlx-q4"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk with Moshi (this version: over a recording, --input-file)",
                       description="Full-duplex conversation with Moshi. This version processes a recording "
                                   "frame by frame (--input-file / --output-file); live microphone/speaker mode "
                                   "comes next.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"converted directory, Kyutai checkpoint directory or repo id (default {DEFAULT_MODEL})")
    p.add_argument("-q", "--quantize", type=int, choices=[4, 8], default=None,
                   help="quantize a full-precision checkpoint while loading")
    p.add_argument("--temp", type=float, default=0.8, help="audio sampling temperature (0 = greedy)")
    p.add_argument("--temp-text", type=float, default=0.7, help="text sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=250, help="audio top-k")
    p.add_argument("--top-k-text", type=int, default=25, help="text top-k")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--input-file", type=Path, default=None, help="the user's side, as an audio file")
    p.add_argument("--output-file", type=Path, default=None, help="write Moshi's side here (24 kHz wav)")
    p.add_argument("--record", type=Path, default=None, help="write both sides to a stereo wav (user, Moshi)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much audio")
    p.add_argument("--quiet-text", action="store_true",
                   help="do not print Moshi's words")
    p.set_defaults(run=run)


def load_session(args: argparse.Namespace):
    from moshi_mlx.duplex import DuplexSession
    from moshi_mlx.models.moshi import MoshiForConditionalGeneration
    from moshi_mlx.tokenizer import TextTokenizer

    model = MoshiForConditionalGeneration.from_pretrained(args.model, quantize=args.quantize)
    cfg = model.config
    tokenizer = TextTokenizer.from_pretrained(model.home, name=model.raw_config.get("tokenizer_name"),
                                              padding_id=cfg.existing_text_padding_id,
                                              end_of_padding_id=cfg.existing_text_end_padding_id)
    return DuplexSession(model, tokenizer=tokenizer, temp=args.temp, temp_text=args.temp_text, top_k=args.top_k,
                         top_k_text=args.top_k_text, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from moshi_mlx.errors import InputError

    if args.input_file is None:
        raise InputError("live audio is not available in this version yet: run the conversation over a "
                         "recording with --input-file IN.wav --output-file OUT.wav")
    if args.output_file is None and args.record is None:
        raise InputError("--input-file needs --output-file and/or --record to write Moshi's side to")
    for out in (args.output_file, args.record):
        if out is not None and not out.parent.exists():
            raise InputError(f"{out.parent}: output directory does not exist")
    return run_file(args)


def run_file(args: argparse.Namespace) -> int:
    from moshi_mlx.audio import read_audio, write_wav

    session = load_session(args)
    rate, frame = session.mimi.sampling_rate, session.frame_size
    user = read_audio(args.input_file, rate, quiet=False).pcm
    if args.max_minutes is not None:
        user = user[: int(args.max_minutes * 60 * rate)]
    frames = -(-len(user) // frame)
    padded = np.pad(user, (0, frames * frame - len(user)))
    moshi = np.zeros_like(padded)
    t0 = time.perf_counter()
    for i in range(frames):
        out = session.step(padded[i * frame:(i + 1) * frame])
        moshi[i * frame:(i + 1) * frame] = out.pcm
        if out.text and not args.quiet_text:
            print(out.text, end="", flush=True)
    elapsed = time.perf_counter() - t0
    if not args.quiet_text:
        print(flush=True)
    moshi = moshi[: len(user)]
    if args.output_file is not None:
        write_wav(args.output_file, moshi, rate)
    if args.record is not None:
        write_wav(args.record, np.stack([user, moshi], axis=1), rate)
    seconds = len(user) / rate
    print(f"{frames} frames ({seconds:.1f} s) in {elapsed:.1f} s: {elapsed / max(frames, 1) * 1e3:.0f} ms per "
          f"80 ms frame ({seconds / max(elapsed, 1e-9):.2f}x real time)", file=sys.stderr)
    return 0
