"""Runs in a separate virtualenv with Kyutai's `moshi-mlx` 0.3.0 (whose import name clashes
with ours): loads a PyTorch release-layout LM with Kyutai's own MLX code, optionally quantizes
it with MLX's default predicate as their tools do, and writes their MLX weights file.

usage: python kyutai_mlx_writer.py CONFIG_JSON PYTORCH_WEIGHTS OUT_FILE BITS(0|4|8)
"""
import json
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from moshi_mlx.models.lm import Lm, LmConfig

config_path, src, out, bits = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lm_config = LmConfig.from_config_dict(json.load(open(config_path)))
model = Lm(lm_config)
model.load_pytorch_weights(src, lm_config, strict=True)
if bits:
    nn.quantize(model, bits=bits, group_size={4: 32, 8: 64}[bits])
params = dict(tree_flatten(model.parameters()))
mx.save_safetensors(out, params)
print(f"wrote {len(params)} tensors to {out}")
