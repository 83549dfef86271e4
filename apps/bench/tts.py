"""`moshi-mlx bench tts`: text-to-speech speed, moshi_mlx (the `TextToSpeech` class that
`moshi-mlx tts` runs) vs Kyutai's PyTorch `TTSModel.generate`, random weights in the shape of
kyutai/tts-1.6b-en_fr (conditioned on a voice, CFG-distilled, all 32 codebooks, sampling at
temperature 0.6). Both decode their audio with Mimi frame by frame as it is generated, so
the time to first audio includes the 16 + 2 steps before the first audio frame."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import impl_name, mlx_float_dtype, peak_rss_mb, print_row, run_job, sync_torch, table

TEXT = ("In the heart of an ancient forest, where the trees whispered secrets of the past, there lived a "
        "peculiar rabbit named Loona. She spent her days listening to the wind and counting the leaves that fell "
        "around her burrow, waiting for the spring to come back.")
CFG_VALUES = ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]


def tts_kwargs() -> dict:
    """kyutai/tts-1.6b-en_fr's config.json (see ../shared/KYUTAI_STT_TTS_WEB.md, B1)."""
    return dict(
        dim=2048, text_card=8000, existing_text_padding_id=3, n_q=32, dep_q=32, card=2048, num_heads=16,
        num_layers=16, hidden_scale=4.125, causal=True, layer_scale=None, context=500, max_period=10000,
        gating="silu", norm="rms_norm_f32", positional_embedding="rope", depformer_dim=1024,
        depformer_num_heads=16, depformer_num_layers=4, depformer_dim_feedforward=3072,
        depformer_multi_linear=True, depformer_pos_emb="none", depformer_weights_per_step=True,
        depformer_low_rank_embeddings=128,
        depformer_weights_per_step_schedule=list(range(8)) + [8] * 8 + [9] * 8 + [10] * 8,
        demux_second_stream=True, cross_attention=True, delays=[0, 0] + [2] * 31,
        conditioners={"speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}},
                      "cfg": {"type": "lut", "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop",
                                                     "possible_values": CFG_VALUES}},
                      "control": {"type": "lut", "lut": {"n_bins": 1, "dim": 2048, "tokenizer": "noop",
                                                         "possible_values": ["ok"]}}},
        fuser={"cross_attention_pos_emb": True, "cross_attention_pos_emb_scale": 1, "sum": ["control", "cfg"],
               "prepend": [], "cross": ["speaker_wavs"]})


DELAY_STEPS = 16  # tts_config.audio_delay 1.28 s
AHEAD = 2  # tts_config.second_stream_ahead


@dataclass
class TtsJob:
    impl: str  # "moshi_mlx" or "torch"
    bits: int = 0  # moshi_mlx quantization (0 = full precision)
    dtype: str = "fp32"  # "fp32" or "bf16": torch's; moshi_mlx's full precision (the label only)
    seconds: float = 10.0  # audio to generate (the text is long enough)
    torch_device: str = "cpu"

    @property
    def uses_moshi_mlx(self) -> bool:
        return self.impl == "moshi_mlx"

    @property
    def label(self) -> str:
        return f"tts-1.6b {'q%d' % self.bits if self.bits else self.dtype}"

    def run(self) -> dict:
        return _bench_torch(self) if self.impl == "torch" else _bench_mlx(self)


class _Tokenizer:
    """Random weights need no vocabulary: two tokens per word, as many of Kyutai's words have."""

    @staticmethod
    def encode(word: str) -> list[int]:
        return [4 + len(word) % 97, 200 + sum(map(ord, word)) % 7000]


def _voice() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((125, 512)) * 0.7).astype(np.float32)


def build_tts(bits: int):
    """A TextToSpeech with random weights in tts-1.6b's shape (bits 0: full precision)."""
    import mlx.core as mx

    from moshi_mlx.models.lm import LmConfig, LMModel
    from moshi_mlx.models.mimi import MimiModel
    from moshi_mlx.quantize import QuantizationSpec, cast_floating, compute_dtype, eval_by_layer, quantize_model
    from moshi_mlx.sessions.tts import TextToSpeech, TtsConfig

    mimi = MimiModel()
    mimi.drop_encoder()  # as TextToSpeech.from_pretrained does
    mx.eval(mimi.parameters())
    kwargs = tts_kwargs()
    lm = LMModel(LmConfig(**kwargs))  # lazy random init: never all in fp32 when quantized
    if bits:
        quantize_model(lm, QuantizationSpec.make(bits))
    cast_floating(lm, compute_dtype())
    eval_by_layer(lm)
    config = TtsConfig.from_config({**kwargs, "model_type": "tts",
                                    "tts_config": {"audio_delay": 1.28, "second_stream_ahead": AHEAD}})
    return TextToSpeech(lm, mimi, _Tokenizer(), config)


def _bench_mlx(job: TtsJob) -> dict:
    import time

    t0 = time.perf_counter()
    tts = build_tts(job.bits)
    load_s = time.perf_counter() - t0
    voice = _voice()
    warm = tts.stream(voice, seed=1)  # allocation, first calls
    warm.push(TEXT)
    warm.close()
    for _ in range(DELAY_STEPS + 4):
        warm.step()
    del warm
    stream = tts.stream(voice, seed=0)
    t1 = time.perf_counter()
    stream.push(TEXT)
    stream.close()
    first, frames, steps = None, 0, 0
    while stream.ready and frames * 0.08 < job.seconds:
        if stream.step()[0] is not None:
            frames += 1
            first = time.perf_counter() - t1 if first is None else first
        steps += 1
    elapsed = time.perf_counter() - t1
    return {"elapsed_s": elapsed, "steps": steps, "audio_s": frames * 0.08, "first_audio_s": first,
            "peak_rss_mb": peak_rss_mb(), "load_s": load_s}


def _bench_torch(job: TtsJob) -> dict:
    import copy
    import time

    import torch
    from moshi.conditioners import ConditionAttributes, TensorCondition
    from moshi.models.loaders import get_mimi, get_moshi_lm
    from moshi.models.tts import StateMachine, TokenIds, TTSModel

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    device = job.torch_device
    mimi = get_mimi(None, device=device)
    mimi.set_num_codebooks(32)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job.dtype]
    lm = get_moshi_lm(None, lm_kwargs=copy.deepcopy(tts_kwargs()), device=device, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    machine = StateMachine(TokenIds(8001), second_stream_ahead=AHEAD, max_padding=8, initial_padding=2)
    tts = TTSModel(lm=lm, mimi=mimi, tokenizer=_Tokenizer(), voice_suffix="", voice_repo="", machine=machine,
                   delay_steps=DELAY_STEPS, temp=0.6)
    voice = torch.from_numpy(np.tile(_voice(), (5, 1)))[None].to(device)
    mask = torch.zeros(1, 5 * 125, dtype=torch.bool, device=device)
    mask[:, :125] = True
    attrs = ConditionAttributes(text={"control": "ok", "cfg": "2.0"},
                                tensor={"speaker_wavs": TensorCondition(voice, mask)})
    entries = tts.prepare_script([TEXT], padding_between=1)
    times: dict = {"first": None, "frames": 0}

    def on_frame(frame):  # decode as the streaming scripts do
        if (frame[:, 1:] >= 0).all():
            tts.mimi.decode(frame[:, 1:])
            sync_torch(device)  # audio that is ready to play
            times["frames"] += 1
            if times["first"] is None:
                times["first"] = time.perf_counter() - times["t1"]

    tts.max_gen_length = DELAY_STEPS + 6  # warm-up
    times["t1"] = time.perf_counter()
    with tts.mimi.streaming(1):
        tts.generate([entries], [attrs], on_frame=on_frame)
    times.update(first=None, frames=0)
    steps = int(job.seconds / 0.08) + DELAY_STEPS + AHEAD
    tts.max_gen_length = steps
    times["t1"] = time.perf_counter()
    with tts.mimi.streaming(1):
        tts.generate([entries], [attrs], on_frame=on_frame)
    sync_torch(device)
    elapsed = time.perf_counter() - times["t1"]
    return {"elapsed_s": elapsed, "steps": steps, "audio_s": times["frames"] * 0.08, "first_audio_s": times["first"],
            "peak_rss_mb": peak_rss_mb(), "load_s": load_s}


def rows(torch_device: str = "cpu") -> list[TtsJob]:
    jobs = [TtsJob("moshi_mlx", dtype=mlx_float_dtype()), TtsJob("moshi_mlx", bits=8), TtsJob("moshi_mlx", bits=4),
            TtsJob("torch"), TtsJob("torch", dtype="bf16")]
    for job in jobs:
        job.torch_device = torch_device
    return jobs


def run(args) -> int:
    rows_out = []
    for job in rows(args.torch_device):
        job.seconds = args.seconds
        print(f"running {job.impl} {job.label} …", file=sys.stderr)
        res = run_job(job)
        res.update(impl=impl_name(job), config=job.label)
        rows_out.append(res)
        print_row(format_table([res]))
    print(format_table(rows_out))
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=2) + "\n")
    return 0


def format_table(rows: list[dict]) -> str:
    head = ("implementation", "config", "× real time", "ms per step", "first audio s", "peak RSS MB", "load s")
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["impl"], r["config"]] + ["n/a"] * 4 + [f"({r['error']})"])
            continue
        out.append([r["impl"], r["config"], f"{r['audio_s'] / r['elapsed_s']:.2f}",
                    f"{r['elapsed_s'] / r['steps'] * 1e3:.0f}",
                    "—" if r["first_audio_s"] is None else f"{r['first_audio_s']:.2f}",
                    f"{r['peak_rss_mb']:.0f}", f"{r['load_s']:.1f}"])
    return table(head, out) + (
        "\nrandom weights in kyutai/tts-1.6b-en_fr's shape (d 2048, 16 layers + cross-attention to 5×125 voice "
        "frames; depformer 4 layers × 32 codebooks, 11 weight sets, low-rank embeddings), one voice, CFG-distilled "
        "(cfg 2.0), temperature 0.6; × real time = seconds of audio per wall second (audio decoded by Mimi frame "
        "by frame included); first audio = wall time until the first 80 ms of audio is decoded (16 + 2 steps "
        "of delay first)")
