"""`moshi-mlx bench convert`: a synthetic checkpoint with the real 7B release key names and
shapes (bf16, ~15 GB, generated on disk in bounded memory), converted to q4 and q8, each
conversion in a child process (`moshi-mlx convert`)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def kyutai_7b_shapes() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of Kyutai's Moshi 7B release `model.safetensors`."""
    from moshi_mlx.models.lm import LmConfig

    c = LmConfig()
    D, d = c.dim, c.depformer_dim
    hid, dhid = c.temporal().gating_hidden, c.depformer().gating_hidden
    shapes: dict[str, tuple[int, ...]] = {"text_emb.weight": (c.text_card + 1, D), "out_norm.alpha": (1, 1, D),
                                          "text_linear.weight": (c.text_card, D),
                                          "depformer_text_emb.weight": (c.text_card + 1, d)}
    for k in range(c.n_q):
        shapes[f"emb.{k}.weight"] = (c.card + 1, D)
    for n in range(c.num_layers):
        p = f"transformer.layers.{n}."
        shapes.update({p + "self_attn.in_proj_weight": (3 * D, D), p + "self_attn.out_proj.weight": (D, D),
                       p + "norm1.alpha": (1, 1, D), p + "norm2.alpha": (1, 1, D),
                       p + "gating.linear_in.weight": (2 * hid, D), p + "gating.linear_out.weight": (D, hid)})
    for i in range(c.dep_q):
        shapes[f"depformer_in.{i}.weight"] = (d, D)
        shapes[f"linears.{i}.weight"] = (c.card, d)
        if i < c.dep_q - 1:
            shapes[f"depformer_emb.{i}.weight"] = (c.card + 1, d)
    for n in range(c.depformer_num_layers):
        p = f"depformer.layers.{n}."
        shapes.update({p + "self_attn.in_proj_weight": (c.dep_q * 3 * d, d),
                       p + "self_attn.out_proj.weight": (c.dep_q * d, d),
                       p + "norm1.alpha": (1, 1, d), p + "norm2.alpha": (1, 1, d)})
        for i in range(c.dep_q):
            shapes[p + f"gating.{i}.linear_in.weight"] = (2 * dhid, d)
            shapes[p + f"gating.{i}.linear_out.weight"] = (d, dhid)
    return shapes


def run(args) -> int:
    import resource
    import shutil
    import time

    import mlx.core as mx

    from moshi_mlx.checkpoints.safetensors import write_safetensors

    with tempfile.TemporaryDirectory(prefix="moshi-mlx-bench-convert-", dir=os.environ.get("TMPDIR")) as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        t0 = time.perf_counter()
        lazy = {k: (mx.random.uniform(-0.02, 0.02, shape) if not k.endswith("alpha") else mx.ones(shape)).astype(mx.bfloat16)
                for k, shape in kyutai_7b_shapes().items()}
        write_safetensors(src / "model.safetensors", lazy, what="synthetic 7B bf16")
        size = (src / "model.safetensors").stat().st_size
        print(f"synthetic 7B bf16 checkpoint: {size / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        rows = []
        for bits in (4, 8):
            out = Path(tmp) / f"q{bits}"
            cmd = [sys.executable, "-m", "moshi_mlx", "convert", str(src), "-o", str(out), "-q", "--q-bits", str(bits)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                rows.append((bits, None, None, None, None, proc.stderr.strip().splitlines()[-1][:100]))
                continue
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # max over children so far
            out_size = sum(p.stat().st_size for p in out.iterdir())
            rows.append((bits, wall, size / wall / 1e9, rss, out_size / 1e9, ""))
            shutil.rmtree(out)
    lines = ["conversion | wall s | source GB/s | peak RSS MB (max so far) | output GB",
             "--- | --- | --- | --- | ---"]
    for bits, wall, gbs, rss, out_gb, err in rows:
        if wall is None:
            lines.append(f"bf16 → q{bits} | failed: {err} | | |")
        else:
            lines.append(f"bf16 → q{bits} | {wall:.0f} | {gbs:.2f} | {rss:.0f} | {out_gb:.2f}")
    print("\n".join(lines) + f"\nsource: synthetic Moshi 7B release layout, bf16, {size / 1e9:.1f} GB")
    return 0
