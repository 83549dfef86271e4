"""`moshi-mlx convert`: a PyTorch release, a transformers checkpoint or a fine-tune → an MLX
checkpoint directory (optionally 4- or 8-bit), in bounded memory.

Bounded memory: source tensors are memory-mapped lazily (mx.load), mapped to moshi_mlx's
names by the same functions the loaders use (weights.py), and written tensor by tensor by a
streaming safetensors writer: only one layer's tensors are ever materialized.

Atomic: everything is written to a temporary directory beside the output and renamed at the
end; on any failure it is removed. The source is only read.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from moshi_mlx.errors import CheckpointError, InputError

DTYPES = {"bf16": mx.bfloat16, "f16": mx.float16, "f32": mx.float32}
FORMAT = "moshi_mlx/1"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="PyTorch/transformers Moshi checkpoint (+ LoRA) → (quantized) MLX directory",
                       description="Convert a Moshi checkpoint (Kyutai PyTorch release, Kyutai 8-bit release, "
                                   "transformers layout, optionally with a LoRA adapter merged) to an MLX "
                                   "directory that `from_pretrained(DIR)` and every app's --model take.")
    p.add_argument("source", help="local file or directory, or a Hugging Face repo id")
    p.add_argument("-o", "--output", "--mlx-path", dest="output", type=Path, required=True,
                   help="output directory (refused if it exists, unless --force)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the LM weights")
    p.add_argument("--q-bits", type=int, default=4, choices=[4, 8], help="bits per weight (default 4)")
    p.add_argument("--q-group-size", type=int, default=None,
                   help="quantization group size (default 32 for 4-bit, 64 for 8-bit)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="dtype of the weights that are not quantized (default bf16)")
    p.add_argument("--lora", default=None, help="LoRA adapter (.safetensors) to merge before quantizing")
    p.add_argument("--lora-scaling", type=float, default=None,
                   help="LoRA scaling (default: the adapter's config.json `lora_scaling`, else 2.0)")
    p.add_argument("--upload-repo", default=None, help="upload the result to this Hugging Face repo")
    p.add_argument("--revision", default=None, help="source repo revision")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = convert(args.source, args.output, quantize=args.quantize, q_bits=args.q_bits,
                  q_group_size=args.q_group_size, dtype=args.dtype, lora=args.lora, lora_scaling=args.lora_scaling,
                  upload_repo=args.upload_repo, revision=args.revision, force=args.force)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def convert(source: str | Path, output: str | Path, quantize: bool = False, q_bits: int = 4,
            q_group_size: int | None = None, dtype: str = "bf16", lora: str | Path | None = None,
            lora_scaling: float | None = None, upload_repo: str | None = None, revision: str | None = None,
            force: bool = False, progress: bool = True) -> Path:
    from moshi_mlx import weights as W
    from moshi_mlx.quantize import QuantizationSpec

    output = Path(output).expanduser()
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    spec = QuantizationSpec.make(q_bits, q_group_size) if quantize else None
    if output.exists() and not force:
        raise InputError(f"{output} exists: choose another output or pass --force")
    if not output.parent.exists():
        raise InputError(f"{output.parent}: output's parent directory does not exist")

    plan = W.lm_conversion_plan(source, revision=revision, spec=spec, dtype=DTYPES[dtype], lora=lora,
                                lora_scaling=lora_scaling)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent))
    try:
        weights_name = f"model.q{spec.bits}.safetensors" if spec else "model.safetensors"
        W.write_safetensors(tmp / weights_name, plan.tensors, metadata={"format": FORMAT},
                            progress=progress, what="LM weights")
        files = {"moshi_name": weights_name}
        if plan.mimi_tensors:  # transformers checkpoints embed Mimi: write it beside the LM
            W.write_safetensors(tmp / "mimi.safetensors", plan.mimi_tensors, progress=progress, what="Mimi weights")
            files["mimi_name"] = "mimi.safetensors"
        for role, path in plan.companions.items():  # Mimi weights, tokenizer: copied as they are
            shutil.copyfile(path, tmp / path.name)
            files[role] = path.name
        config = {**plan.config, **files, "moshi_mlx_format": FORMAT,
                  "quantization": spec.to_dict() if spec else None, "dtype": dtype}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(source, plan, spec, dtype, lora, files))
        if output.exists():  # --force: replace only once the new one is complete
            shutil.rmtree(output)
        os.replace(tmp, output)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing {output} failed ({e.strerror or e}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if upload_repo:
        _upload(output, upload_repo)
    return output


def _model_card(source, plan, spec, dtype, lora, files) -> str:
    quant = f"{spec.bits}-bit (group size {spec.group_size})" if spec else f"none ({dtype})"
    return f"""---
library_name: moshi_mlx
tags: [moshi, mimi, mlx, speech]
---
# {Path(str(source)).name} for MLX

Converted with `moshi-mlx convert` on {_dt.date.today().isoformat()}.

- source: `{source}` ({plan.layout} layout){f"; LoRA merged: `{lora}`" if lora else ""}
- quantization: {quant}; other weights: {dtype}
- files: {", ".join(f"`{v}`" for v in files.values())}

Run it:

```bash
moshi-mlx chat --model DIR        # or: MoshiForConditionalGeneration.from_pretrained("DIR")
```
"""


def _upload(path: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(path), repo_id=repo)
    except Exception as e:  # noqa: BLE001 - network/auth: the conversion itself succeeded
        raise CheckpointError(f"converted to {path}, but the upload to {repo} failed: {e}") from None
