"""`moshi-mlx convert`: a PyTorch release, a transformers checkpoint or a fine-tune → an MLX
checkpoint directory (optionally 4- or 8-bit), in bounded memory.

Convert = load lazily → quantize → save, as mlx-lm's convert is: the model is built by the
same load path as `from_pretrained` (checkpoints/ mappings, models/loading.py) without
evaluating anything, quantized with the same rule, and its parameters are written tensor
by tensor by a streaming safetensors writer: only one layer's tensors are ever materialized.

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
from dataclasses import dataclass
from pathlib import Path

from moshi_mlx.errors import CheckpointError, InputError

# mlx.core is imported only when converting: `moshi-mlx convert --help` must not load MLX.
DTYPES = ("bf16", "f16", "f32")
GROUP_SIZES = (32, 64, 128)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="PyTorch/transformers Moshi checkpoint (+ LoRA) → (quantized) MLX directory",
                       description="Convert a Moshi checkpoint (Kyutai PyTorch release, Kyutai 8-bit release, "
                                   "transformers layout, optionally with a LoRA adapter merged) to an MLX "
                                   "directory that `from_pretrained(DIR)` and every app's --model take.")
    p.add_argument("source", help="local file or directory, or a Hugging Face repo id")
    p.add_argument("-o", "--output", "--mlx-path", dest="output", type=Path, required=True,
                   help="output directory (refused if it exists, unless --force)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the LM weights (4-bit unless --q-bits)")
    # Giving --q-bits or --q-group-size means quantizing: without it, `--q-bits 8` would
    # silently write a full-precision model.
    p.add_argument("--q-bits", type=int, default=None, choices=[4, 8],
                   help="bits per weight (default 4); implies -q")
    p.add_argument("--q-group-size", type=int, default=None,
                   help=f"quantization group size, one of {', '.join(map(str, GROUP_SIZES))} "
                        "(default 32 for 4-bit, 64 for 8-bit); implies -q")
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
    quantize = args.quantize or args.q_bits is not None or args.q_group_size is not None
    if args.q_group_size is not None and args.q_group_size not in GROUP_SIZES:
        raise InputError(f"--q-group-size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                         f"got {args.q_group_size}")
    out = convert(args.source, args.output, quantize=quantize, q_bits=args.q_bits or 4,
                  q_group_size=args.q_group_size, dtype=args.dtype, lora=args.lora, lora_scaling=args.lora_scaling,
                  upload_repo=args.upload_repo, revision=args.revision, force=args.force)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def convert(source: str | Path, output: str | Path, quantize: bool = False, q_bits: int = 4,
            q_group_size: int | None = None, dtype: str = "bf16", lora: str | Path | None = None,
            lora_scaling: float | None = None, upload_repo: str | None = None, revision: str | None = None,
            force: bool = False, progress: bool = True) -> Path:
    from moshi_mlx.audio import file_mode
    from moshi_mlx.checkpoints.lm import FORMAT as LM_FORMAT
    from moshi_mlx.checkpoints.safetensors import write_safetensors
    from moshi_mlx.quantize import QuantizationSpec

    output = Path(output).expanduser()
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        spec = QuantizationSpec.make(q_bits, q_group_size) if quantize else None
    except ValueError as e:  # bits or group size: the user's arguments, said in one line
        raise InputError(str(e)) from None
    if output.exists() and not force:
        raise InputError(f"{output} exists: choose another output or pass --force")
    if not output.parent.exists():
        raise InputError(f"{output.parent}: output's parent directory does not exist")

    plan = plan_conversion(source, revision=revision, spec=spec, dtype=_mx_dtype(dtype), lora=lora,
                           lora_scaling=lora_scaling)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent))
    try:
        os.chmod(tmp, file_mode(directory=True))  # mkdtemp's 0700 would ignore the umask
        weights_name = f"model.q{spec.bits}.safetensors" if spec else "model.safetensors"
        write_safetensors(tmp / weights_name, plan.tensors, metadata={"format": LM_FORMAT},
                            progress=progress, what="LM weights")
        files = {"moshi_name": weights_name}
        if plan.mimi_tensors:  # transformers checkpoints embed Mimi: write it beside the LM
            write_safetensors(tmp / "mimi.safetensors", plan.mimi_tensors, progress=progress, what="Mimi weights")
            files["mimi_name"] = "mimi.safetensors"
        for role, path in plan.companions.items():  # Mimi weights, tokenizer: copied as they are
            shutil.copyfile(path, tmp / path.name)
            files[role] = path.name
        config = {**plan.config, **files, "moshi_mlx_format": LM_FORMAT,
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


@dataclass
class ConversionPlan:
    tensors: dict  # name → lazy mx.array: moshi_mlx names, final dtypes, quantized if asked
    config: dict  # LM kwargs for config.json
    layout: str  # the source's layout
    companions: dict[str, Path]  # config key → file copied as is (mimi_name, tokenizer_name)
    mimi_tensors: dict  # a Mimi embedded in the source (transformers), written beside the LM


def plan_conversion(source, revision=None, spec=None, dtype=None, lora=None, lora_scaling=None) -> ConversionPlan:
    """Load lazily → (merge LoRA) → quantize → the tensors to write: the same load path and
    quantization as `from_pretrained`, so a converted model is bit for bit the model
    quantized in memory. Nothing is materialized here; the writer evaluates one tensor at
    a time."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from moshi_mlx.checkpoints import lm as lm_ckpt
    from moshi_mlx.checkpoints.safetensors import read_safetensors
    from moshi_mlx.models.lm import layout_params, lm_config, lm_from_checkpoint
    from moshi_mlx.quantize import file_scales_dtype, quantize_model

    ckpt = lm_ckpt.read(source, revision)
    if ckpt.layout == "moshi_mlx":
        raise CheckpointError(f"{source} is already a moshi_mlx checkpoint; convert from the original instead")
    if ckpt.layout == "kyutai-mlx":
        raise CheckpointError(f"{source}: Kyutai's MLX files load directly with from_pretrained; nothing to convert")
    deltas = None
    if lora is not None:
        adapter_path = Path(lora).expanduser()
        if lora_scaling is None:
            cfg_path = adapter_path.parent / "config.json"
            lora_scaling = float(json.loads(cfg_path.read_text()).get("lora_scaling", 2.0)) if cfg_path.exists() \
                else 2.0
        adapter = lm_ckpt.lora_deltas(read_safetensors([adapter_path]), lora_scaling)
        deltas = lm_ckpt.from_kyutai(adapter, layout_params(lm_config(ckpt)))
    # Quantize from float32 weights, as loading with quantize= does.
    model = lm_from_checkpoint(ckpt, dtype=mx.float32, evaluate=False, extra=deltas)
    if spec is not None:
        quantize_model(model, spec)
    tensors = {}
    for name, w in tree_flatten(model.parameters()):
        if name.endswith((".scales", ".biases")):
            w = w.astype(file_scales_dtype(spec.bits))
        elif name.startswith("condition_provider."):
            w = w.astype(mx.float32)  # run once per utterance; Kyutai keeps them in float32 too
        elif mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(dtype or mx.bfloat16)
        tensors[name] = w
    config = model.config.to_dict()
    for k in ("moshi_name", "mimi_name", "tokenizer_name"):
        config.pop(k, None)
    if ckpt.raw_config.get("model_id"):
        config["model_id"] = ckpt.raw_config["model_id"]
    embedded = {k[len("audio_encoder."):]: v for k, v in ckpt.state.items() if k.startswith("audio_encoder.")}
    if embedded:
        config["mimi_config"] = ckpt.raw_config.get("audio_encoder_config") or {}
    layout = ckpt.layout + ("-int8" if any(k.endswith("weight_scb") for k in ckpt.state) else "")
    return ConversionPlan(tensors, config, layout, lm_ckpt.companion_files(ckpt, revision), embedded)


def _mx_dtype(name: str):
    import mlx.core as mx

    return {"bf16": mx.bfloat16, "f16": mx.float16, "f32": mx.float32}[name]


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
{_run_hint(plan.config.get("model_type"))}
```
"""


def _run_hint(model_type: str | None) -> str:
    if model_type == "stt":
        return 'moshi-mlx transcribe --model DIR speech.wav   # or: SpeechToText.from_pretrained("DIR")'
    if model_type == "tts":
        return 'moshi-mlx tts --model DIR "Hello." -o hello.wav   # or: TextToSpeech.from_pretrained("DIR")'
    return 'moshi-mlx chat --model DIR        # or: MoshiForConditionalGeneration.from_pretrained("DIR")'



def _upload(path: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(path), repo_id=repo)
    except Exception as e:  # noqa: BLE001 - network/auth: the conversion itself succeeded
        raise CheckpointError(f"converted to {path}, but the upload to {repo} failed: {e}") from None
