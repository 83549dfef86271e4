"""`moshi-mlx bench asr`: speech-to-text throughput, moshi_mlx (the `SpeechToText` class that
`moshi-mlx transcribe` runs) vs Kyutai's PyTorch reference run the way `moshi.run_inference`
runs STT models, on the same audio, with random weights in Kyutai's STT shapes. Mimi
encoding is included everywhere."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import impl_name, mlx_float_dtype, peak_rss_mb, print_row, run_job, sync_torch, table

# Kyutai's STT model shapes (config.json of kyutai/stt-1b-en_fr and stt-2.6b-en).
SHAPES = {
    "1b": dict(dim=2048, num_heads=16, num_layers=16, context=750, text_card=8000, delay=0.5, prefix=0.0),
    "2.6b": dict(dim=2048, num_heads=32, num_layers=48, context=375, text_card=4000, delay=2.5, prefix=1.0),
}


def lm_kwargs(shape: str) -> dict:
    s = SHAPES[shape]
    return dict(dim=s["dim"], num_heads=s["num_heads"], num_layers=s["num_layers"], context=s["context"],
                text_card=s["text_card"], hidden_scale=4.125, max_period=100000.0, n_q=32, dep_q=0, card=2048,
                delays=[0] * 33, extra_heads_num_heads=4, extra_heads_dim=6, existing_text_padding_id=3)


@dataclass
class AsrJob:
    impl: str  # "moshi_mlx" or "torch"
    shape: str  # a key of SHAPES
    batch: int = 1
    bits: int = 0  # moshi_mlx quantization (0 = full precision)
    dtype: str = "fp32"  # "fp32" or "bf16": torch's; moshi_mlx's full precision (the label only)
    seconds: float = 10.0
    audio: str = ""  # a file, or "" for the synthetic default
    torch_device: str = "cpu"
    float_activations: bool = False  # 4-bit products with float activations (MOSHI_MLX_INT8_ACTIVATIONS=0)

    @property
    def uses_moshi_mlx(self) -> bool:
        return self.impl == "moshi_mlx"

    @property
    def label(self) -> str:
        label = f"stt-{self.shape} {'q%d' % self.bits if self.bits else self.dtype}"
        return label + " float act." if self.float_activations else label

    def run(self) -> dict:
        pcm = _audio(self.audio, self.seconds)
        if self.impl == "torch":
            return _bench_torch(self, pcm)
        return _bench_mlx(self, pcm)


def _audio(path: str, seconds: float) -> np.ndarray:
    if path:
        from moshi_mlx.audio import read_audio

        return read_audio(path, 24000).pcm[: int(seconds * 24000)]
    rng = np.random.default_rng(0)  # speech-like: noise under a 4 Hz syllable envelope
    t = np.arange(int(seconds * 24000)) / 24000
    return (0.1 * rng.standard_normal(len(t)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


class _NoTokenizer:
    """Random weights spell nothing: the bench needs no vocabulary."""

    def decode(self, tokens) -> str:
        return "w" * len(list(tokens))


def build_stt(shape: str, bits: int):
    """A SpeechToText with random weights in one of Kyutai's STT shapes (bits 0: full precision)."""
    import mlx.core as mx

    from moshi_mlx.models.lm import LmConfig, LMModel
    from moshi_mlx.models.mimi import MimiModel
    from moshi_mlx.quantize import QuantizationSpec, cast_floating, compute_dtype, eval_by_layer, quantize_model
    from moshi_mlx.sessions.stt import SpeechToText, SttConfig

    mimi = MimiModel()
    mx.eval(mimi.parameters())
    lm = LMModel(LmConfig(**lm_kwargs(shape)))  # lazy random init: never all in fp32 when quantized
    if bits:
        quantize_model(lm, QuantizationSpec.make(bits))
    cast_floating(lm, compute_dtype())
    eval_by_layer(lm)
    s = SHAPES[shape]
    return SpeechToText(lm, mimi, _NoTokenizer(), SttConfig(s["delay"], s["prefix"]))


def _bench_mlx(job: AsrJob, pcm: np.ndarray) -> dict:
    import time

    from moshi_mlx.cpu import kernels

    if job.float_activations:
        kernels.INT8_ACTIVATIONS = False
    t0 = time.perf_counter()
    stt = build_stt(job.shape, job.bits)
    load_s = time.perf_counter() - t0
    # Warm-up (allocation, first calls), then the timed run over the whole clip.
    stt.transcribe_batch([pcm[:24000]] * job.batch)
    first = None
    t1 = time.perf_counter()
    stream = stt.stream(job.batch)
    frame = stt.frame_size
    for i in range(0, len(pcm), frame):  # live captions: frame by frame, as from a microphone
        stream.step(np.repeat(pcm[None, i:i + frame], job.batch, 0))
        if first is None and stream.timers[0].steps >= stt.config.steps_of_delay:
            first = time.perf_counter() - t1  # the first step whose text can hold a word
    stream.flush()
    elapsed = time.perf_counter() - t1
    t2 = time.perf_counter()
    stt.transcribe_batch([pcm] * job.batch)
    offline = time.perf_counter() - t2
    steps = len(stt.padded(pcm)) // frame
    return {"stream_s": elapsed, "offline_s": offline, "steps": steps, "audio_s": len(pcm) / 24000,
            "first_word_s": first, "peak_rss_mb": peak_rss_mb(), "load_s": load_s}


def _bench_torch(job: AsrJob, pcm: np.ndarray) -> dict:
    import time

    import torch
    from moshi.models.lm import LMGen, LMModel
    from moshi.models.loaders import _lm_kwargs, get_mimi

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    device = job.torch_device
    mimi = get_mimi(None, device=device)
    mimi.set_num_codebooks(32)
    kwargs = {**_lm_kwargs, **lm_kwargs(job.shape)}
    lm = LMModel(**kwargs, device=device,
                 dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[job.dtype])).eval()
    load_s = time.perf_counter() - t0
    s = SHAPES[job.shape]
    x = torch.from_numpy(pcm)[None, None].repeat(job.batch, 1, 1).to(device)
    x = torch.nn.functional.pad(x, (int(s["prefix"] * 24000), int((s["delay"] + 1.0) * 24000)))
    chunks = [c for c in x.split(1920, dim=2) if c.shape[-1] == 1920]

    def run(chunks):
        gen = LMGen(lm, use_sampling=False, temp=0.0, temp_text=0.0)
        with mimi.streaming(job.batch), gen.streaming(job.batch):
            for i, chunk in enumerate(chunks):  # moshi.run_inference's STT loop
                codes = mimi.encode(chunk)
                if i == 0:
                    gen.step_with_extra_heads(codes)
                gen.step_with_extra_heads(codes)
        sync_torch(device)

    run(chunks[:12])  # warm-up
    t1 = time.perf_counter()
    run(chunks)
    elapsed = time.perf_counter() - t1
    return {"stream_s": elapsed, "offline_s": None, "steps": len(chunks), "audio_s": len(pcm) / 24000,
            "first_word_s": None, "peak_rss_mb": peak_rss_mb(), "load_s": load_s}


def rows_for(shape: str, torch_device: str = "cpu") -> list[AsrJob]:
    from moshi_mlx.cpu.kernels import kernels_available

    mlx = mlx_float_dtype()
    if shape == "1b":
        rows = [AsrJob("moshi_mlx", "1b", dtype=mlx), AsrJob("moshi_mlx", "1b", bits=8),
                AsrJob("moshi_mlx", "1b", bits=4), AsrJob("moshi_mlx", "1b", batch=8, bits=4)]
        if kernels_available():  # what the kernel's 8-bit activations gain, in the same run
            rows += [AsrJob("moshi_mlx", "1b", bits=4, float_activations=True),
                     AsrJob("moshi_mlx", "1b", batch=8, bits=4, float_activations=True)]
        rows += [AsrJob("torch", "1b"), AsrJob("torch", "1b", dtype="bf16"),
                 AsrJob("torch", "1b", batch=8, dtype="bf16")]
    else:
        rows = [AsrJob("moshi_mlx", "2.6b", bits=4), AsrJob("torch", "2.6b", dtype="bf16")]
    for job in rows:
        job.torch_device = torch_device
    return rows


def run(args) -> int:
    rows = []
    shapes = ["1b"] + ([] if args.no_7b else ["2.6b"])
    for shape in shapes:
        for job in rows_for(shape, args.torch_device):
            job.seconds, job.audio = args.seconds, str(args.audio or "")
            print(f"running {job.impl} {job.label} batch {job.batch} …", file=sys.stderr)
            res = run_job(job)
            res.update(impl=impl_name(job), config=job.label,
                       batch=job.batch)
            rows.append(res)
            print_row(format_table([res]))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def format_table(rows: list[dict]) -> str:
    head = ("implementation", "config", "batch", "live × real time", "ms per step", "offline × real time",
            "first word ready s", "peak RSS MB", "load s")
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["impl"], r["config"], str(r["batch"])] + ["n/a"] * 6 + [f"({r['error']})"])
            continue
        audio = r["steps"] * 0.08 * r["batch"]  # every 80 ms step of every stream, padding included
        out.append([r["impl"], r["config"], str(r["batch"]), f"{audio / r['stream_s']:.2f}",
                    f"{r['stream_s'] / r['steps'] * 1e3:.0f}",
                    "—" if r["offline_s"] is None else f"{audio / r['offline_s']:.2f}",
                    "—" if r["first_word_s"] is None else f"{r['first_word_s']:.2f}",
                    f"{r['peak_rss_mb']:.0f}", f"{r['load_s']:.1f}"])
    return table(head, out) + (
        "\nrandom weights in Kyutai's STT shapes (stt-1b: d 2048, 16 layers; stt-2.6b: 48 layers), 32 Mimi "
        "codebooks, Mimi encoding included; × real time = 80 ms steps (all streams, padding included) per wall "
        "second: ≥ 1 keeps up with live audio; ms per step = one step of the whole batch; live = frame by frame as "
        "from a microphone (PyTorch: moshi.run_inference's loop); offline = SpeechToText.transcribe_batch (Mimi "
        "encodes 16 frames per call); first word ready = wall time, live, until the first step whose text can "
        "hold a word (the model's delay) — random weights spell no real words")
