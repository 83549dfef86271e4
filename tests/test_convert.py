"""`moshi-mlx convert`: every input layout → MLX directory → load → parity; failures leave nothing."""
from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import mlx.core as mx
from moshi_mlx.convert.convert import convert
from moshi_mlx.errors import CheckpointError, InputError
from moshi_mlx.models.moshi import MoshiForConditionalGeneration
from moshi_mlx.quantize import QuantizationSpec, quantize_model
import reference as R
from test_lm_parity import check_logits
from conftest import share_file

pytestmark = pytest.mark.reference


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def kyutai_src(tmp_path_factory, kyutai_mimi):
    """A Kyutai-style directory: LM release file + config.json, the Mimi file, a tokenizer."""
    d = tmp_path_factory.mktemp("kyutai-src")
    kwargs = R.tiny_lm_kwargs()
    ref = R.random_kyutai_lm(kwargs, seed=11)
    R.save_kyutai_lm(ref, d, kwargs)
    share_file(kyutai_mimi[1], d / kyutai_mimi[1].name)
    (d / "tokenizer_spm_32k_3.model").write_bytes(b"sentencepiece model stand-in")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(mimi_name=kyutai_mimi[1].name, tokenizer_name="tokenizer_spm_32k_3.model")
    (d / "config.json").write_text(json.dumps(cfg))
    return ref, d


def test_kyutai_release_to_f32_matches_reference(kyutai_src, tmp_path):
    ref, src = kyutai_src
    before = {p.name: sha(p) for p in src.iterdir()}
    out = convert(src, tmp_path / "out", dtype="f32", progress=False)
    assert {p.name: sha(p) for p in src.iterdir()} == before  # the source is only read
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["README.md", "config.json", "model.safetensors", "tokenizer_spm_32k_3.model",
                            "tokenizer-e351c8d8-checkpoint125.safetensors"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["moshi_name"] == "model.safetensors" and cfg["quantization"] is None and cfg["dim"] == 64
    model = MoshiForConditionalGeneration.from_pretrained(out)
    check_logits(ref, model)
    assert model.mimi.config.num_quantizers == 32  # the Mimi file travelled along


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_conversion_is_bit_identical_to_quantizing_in_memory(kyutai_src, tmp_path, bits):
    _, src = kyutai_src
    q_dir = convert(src, tmp_path / f"q{bits}", quantize=True, q_bits=bits, dtype="f32", progress=False)
    assert (q_dir / f"model.q{bits}.safetensors").exists()
    f32_dir = convert(src, tmp_path / "f32", dtype="f32", progress=False)
    a = MoshiForConditionalGeneration.from_pretrained(q_dir).lm
    b = MoshiForConditionalGeneration.from_pretrained(f32_dir).lm
    quantize_model(b, QuantizationSpec.make(bits))
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert pa.keys() == pb.keys() and any(k.endswith(".scales") for k in pa)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and mx.array_equal(pa[k], pb[k]).item(), k


def test_transformers_layout_converts_and_generates_the_same(tmp_path):
    ref = R.random_transformers_moshi(seed=3)
    ref.save_pretrained(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "out", dtype="f32", progress=False)
    assert (out / "mimi.safetensors").exists()
    ours = MoshiForConditionalGeneration.from_pretrained(out)
    with torch.no_grad():
        want = ref.generate(max_new_tokens=12, do_sample=False, depth_decoder_do_sample=False,
                            return_audio_codes=True, return_audio_waveforms=False)
    got = ours.generate(max_new_tokens=12, do_sample=False, depth_decoder_do_sample=False,
                        return_audio_waveforms=False)
    np.testing.assert_array_equal(np.array(got.sequences), want.sequences.numpy())
    np.testing.assert_array_equal(np.array(got.audio_codes), want.audio_codes.numpy())


def test_lora_is_merged_like_kyutai(kyutai_src, tmp_path):
    """A random adapter made with Kyutai's LoRA layers: the merged conversion equals the
    reference model with the adapter applied."""
    from moshi.modules.lora import replace_all_linear_with_lora, replace_lora_with_linear
    from safetensors.torch import save_file

    ref, src = kyutai_src
    torch.manual_seed(5)
    lora_model = copy.deepcopy(ref)
    replace_all_linear_with_lora(lora_model, rank=4, scaling=2.0)
    adapter = {}
    with torch.no_grad():
        for k, v in lora_model.state_dict().items():
            if ".lora_A." in k or ".lora_B." in k:
                v.copy_(torch.randn_like(v) * 0.05)
                adapter[k] = v.clone().contiguous()
    save_file(adapter, str(tmp_path / "adapter.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"lora_rank": 4, "lora_scaling": 2.0}))
    with torch.no_grad():
        replace_lora_with_linear(lora_model)
    out = convert(src, tmp_path / "out", dtype="f32", lora=tmp_path / "adapter.safetensors", progress=False)
    check_logits(lora_model, MoshiForConditionalGeneration.from_pretrained(out))


def test_bitsandbytes_int8_release_is_dequantized_like_bnb(kyutai_src, tmp_path):
    """Kyutai's q8 releases store LLM.int8 vector-wise weights (int8 + per-row absmax
    `weight_scb`); bitsandbytes dequantizes them as CB · SCB / 127."""
    from safetensors.torch import save_file

    ref, src = kyutai_src
    state = R.kyutai_release_state_dict(ref)
    q8, dequantized = {}, {}
    for k, v in state.items():
        is_linear = v.dim() == 2 and "emb" not in k
        if is_linear:
            scb = v.abs().amax(dim=1).float()
            cb = torch.round(v * 127.0 / scb[:, None]).to(torch.int8)
            q8[k], q8[k + "_scb"] = cb, scb
            dequantized[k] = cb.float() * scb[:, None] / 127.0  # bitsandbytes' int8_vectorwise_dequant
        else:
            q8[k] = dequantized[k] = v
    d = tmp_path / "q8src"
    d.mkdir()
    save_file(q8, str(d / "model.q8.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("moshi_name", "mimi_name", "tokenizer_name")}
    (d / "config.json").write_text(json.dumps(cfg))  # no moshi_name: the q8 release file name is found
    # the reference model with the dequantized weights
    deq_ref = copy.deepcopy(ref)
    deq_ref.load_state_dict(dequantized, strict=False)
    out = convert(d, tmp_path / "out", dtype="f32", progress=False)
    model = MoshiForConditionalGeneration.from_pretrained(out)
    np.testing.assert_allclose(np.array(model.lm.text_linear.weight), dequantized["text_linear.weight"].numpy(),
                               rtol=1e-6, atol=1e-7)
    check_logits(deq_ref, model)


def test_existing_output_is_refused_unless_forced(kyutai_src, tmp_path):
    _, src = kyutai_src
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="exists"):
        convert(src, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert(src, out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_bad_sources_leave_nothing(kyutai_src, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, src = kyutai_src
    bad = tmp_path / "bad"
    bad.mkdir()
    state = load_file(str(src / "model.safetensors"))
    state.pop("linears.3.weight")
    save_file(state, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"missing keys: linears\.3\.weight"):
        convert(bad, tmp_path / "o1", progress=False)
    save_file({"foo": np.zeros(3, np.float32)}, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown Moshi LM checkpoint layout"):
        convert(bad, tmp_path / "o2", progress=False)
    data = (src / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        convert(bad, tmp_path / "o3", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no outputs, no temporaries


def test_disk_full_leaves_nothing(kyutai_src, tmp_path):
    """A write error mid-way (file size limit standing in for a full disk): clear error, exit 2,
    no output and no temporary directory."""
    _, src = kyutai_src
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000)); "
            "from moshi_mlx.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "convert", str(src), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "error: writing" in proc.stderr and "nothing was written" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_q4(kyutai_src, tmp_path):
    _, src = kyutai_src
    proc = subprocess.run([sys.executable, "-m", "moshi_mlx", "convert", str(src), "-o", str(tmp_path / "q4"),
                           "-q", "--q-bits", "4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization"] == {"bits": 4, "group_size": 32}
    assert "model.q4.safetensors" in (tmp_path / "q4" / "README.md").read_text()


def test_loader_reads_what_the_file_says(kyutai_src, tmp_path):
    """What is quantized is read from the file: exactly the layers with `.scales` (here a file
    whose text head was left in full precision), and the format marker is checked."""
    from safetensors.numpy import load_file, save_file

    _, src = kyutai_src
    out = convert(src, tmp_path / "q8", quantize=True, q_bits=8, dtype="f32", progress=False)
    f32 = convert(src, tmp_path / "f32", dtype="f32", progress=False)
    state = load_file(str(out / "model.q8.safetensors"))
    for k in ("text_linear.scales", "text_linear.biases"):
        del state[k]
    state["text_linear.weight"] = load_file(str(f32 / "model.safetensors"))["text_linear.weight"]
    save_file(state, str(out / "model.q8.safetensors"))
    lm = MoshiForConditionalGeneration.from_pretrained(out).lm
    assert type(lm.text_linear).__name__ == "Linear" and "scales" in lm.transformer.layers[0].self_attn.in_proj
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "moshi_mlx_format": "moshi_mlx/9"}))
    with pytest.raises(CheckpointError, match="format 'moshi_mlx/9'"):
        MoshiForConditionalGeneration.from_pretrained(out)
