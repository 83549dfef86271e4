"""What every benchmark shares: jobs run in fresh worker processes (so peak RSS is each
implementation's own), typed job descriptions passed as JSON, timing and memory helpers."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys


def run_job(job) -> dict:
    """Run `job` (a dataclass from one of the bench modules) in a fresh process; its result
    dict, or {"error": ...} with the worker's last line of stderr."""
    payload = json.dumps({"module": type(job).__module__, "job": type(job).__name__,
                          "args": dataclasses.asdict(job)})
    env = os.environ.copy()
    if not getattr(job, "uses_moshi_mlx", True):
        # Keep our OpenBLAS out of the references' processes (torch brings its own BLAS and
        # OpenMP threads; a second BLAS thread pool would distort their timings).
        env["MOSHI_MLX_BLAS"] = "0"
    proc = subprocess.run([sys.executable, "-m", "moshi_mlx.apps.bench.worker", payload], capture_output=True,
                          text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:160]}


def mlx_float_dtype() -> str:
    """The dtype full-precision moshi_mlx rows compute in here (float32 on the CPU backend,
    bfloat16 on a GPU; MOSHI_MLX_DTYPE overrides), as rows label it."""
    import mlx.core as mx

    from moshi_mlx.quantize import compute_dtype

    return {mx.float32: "fp32", mx.bfloat16: "bf16", mx.float16: "fp16"}[compute_dtype()]


def impl_name(job) -> str:
    """A row's implementation column: where it ran when that is not the CPU."""
    if getattr(job, "uses_moshi_mlx", True):
        import mlx.core as mx

        return "moshi_mlx" if mx.default_device() == mx.cpu else "moshi_mlx (MLX gpu)"
    device = getattr(job, "torch_device", "cpu")
    return "moshi (PyTorch)" if device == "cpu" else f"moshi (PyTorch, {device})"


def sync_torch(device: str) -> None:
    """Wait for a GPU's queued work, so that a timer read next counts it."""
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def print_row(table_text: str) -> None:
    """A one-row table's row, on stderr: each measurement shown as it is made (a run stopped
    midway keeps what it measured)."""
    print("  " + table_text.splitlines()[2], file=sys.stderr)


def peak_rss_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def timeit(fn, repeat: int = 3) -> float:
    """Median of `repeat` timed runs after one warm-up run (compilation, allocation)."""
    import time

    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def table(head: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    return "\n".join(lines + [" | ".join(r) for r in rows])


def pick(wanted: str, known: tuple[str, ...], what: str) -> list[str]:
    """Parse a comma-separated --only list, refusing unknown names (one line)."""
    from moshi_mlx.errors import InputError

    names = [s.strip() for s in wanted.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise InputError(f"--only: unknown {what} {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(known)}")
    return names
