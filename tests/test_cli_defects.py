"""User-facing defects of the command line, one test each: help without MLX, one meaning for
-q, failing fast on the hub, inputs checked before models load, portable codes files,
convert's quantization arguments, chat's argument ranges, no audio devices, the umask,
output formats, truncated input, and Ctrl-C in file-mode chat.

Every error is one `error: …` line on stderr, exit status 2, no traceback, no partial file."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors import safe_open
from safetensors.numpy import save_file

import moshi_mlx
from moshi_mlx.errors import CheckpointError, InputError

NO_SUCH_MODEL = "/nonexistent/mimi-model-dir"  # any model load would fail (or be slow, for a repo id)


def cli(*args, cwd=None, env=None, umask=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "moshi_mlx", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def no_partial_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".part")]


@pytest.fixture()
def wav(tmp_path):
    path = tmp_path / "in.wav"
    sf.write(path, (0.1 * np.sin(np.arange(24000) * 0.05)).astype(np.float32), 24000)
    return path


@pytest.fixture(scope="module")
def codes_file(tmp_path_factory, kyutai_mimi):
    """A `moshi-mlx encode` output (1.2 s, 8 codebooks) recording the Mimi file's absolute path."""
    d = tmp_path_factory.mktemp("codes")
    sf.write(d / "in.wav", (0.1 * np.random.default_rng(0).standard_normal(28800)).astype(np.float32), 24000)
    proc = cli("encode", d / "in.wav", d / "codes.safetensors", "--model", kyutai_mimi[1], "-n", "8", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return d / "codes.safetensors"


# 1. Help without MLX ---------------------------------------------------------------------

def test_help_never_imports_mlx():
    code = """
import sys
from moshi_mlx.cli import main
for argv in (["--help"], ["encode", "--help"], ["decode", "--help"], ["convert", "--help"], ["chat", "--help"],
             ["bench", "--help"], ["transcribe", "--help"], ["--version"], ["-v", "encode", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
    assert "mlx.core" not in sys.modules, argv
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for usage in ("usage: moshi-mlx encode", "usage: moshi-mlx convert", "usage: moshi-mlx chat"):
        assert usage in proc.stdout


def test_top_level_help_lists_every_subcommand_with_its_help():
    from moshi_mlx.cli import SUBCOMMANDS

    out = cli("--help").stdout
    for name, (_, help_text) in SUBCOMMANDS.items():
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), name
    assert "talk with Moshi" in out and "Mimi codes" in out


def test_argparse_errors_are_one_line():
    assert_one_line_error(cli("no-such-subcommand"), "invalid choice", "encode")
    assert_one_line_error(cli("encode"), "required")


# 2. -q means quantize everywhere -------------------------------------------------------

def test_q_is_not_quiet_for_encode_and_decode(wav, tmp_path):
    for sub in ("encode", "decode"):
        help_text = cli(sub, "--help").stdout
        assert "--quiet" in help_text and not re.search(r"(^|\s)-q[ ,]", help_text), help_text
    assert_one_line_error(cli("encode", wav, tmp_path / "c.safetensors", "-q"), "unrecognized arguments: -q")
    for sub in ("convert", "chat"):
        assert re.search(r"-q( \{4,8\})?, --quantize", cli(sub, "--help").stdout)


# 3. The hub: missing local paths, offline, no network ------------------------------------

def test_repo_id_or_local_path():
    from moshi_mlx.checkpoints.hub import is_local

    for local in ("models/x.safetensors", "x.safetensors", "dir/config.json", "a/b/c", "./m", "/abs", "~/m",
                  "tok.model", "with space/x"):
        assert is_local(local), local
    for repo in ("kyutai/mimi", "kyutai/moshiko-mlx-q4", "gpt2", "org/Llama-3.1-8B", "org/model.v2"):
        assert not is_local(repo), repo


def test_missing_local_weights_are_a_missing_file_not_a_repo():
    from moshi_mlx import MimiModel

    with pytest.raises(CheckpointError, match="no such file"):
        MimiModel.from_pretrained("models/x.safetensors")


def hub_env(tmp_path, offline: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.parametrize("offline,limit", [(True, 5.0), (False, 10.0)])
def test_unknown_repo_fails_fast_in_one_line(tmp_path, wav, offline, limit):
    t0 = time.monotonic()
    proc = cli("encode", wav, tmp_path / "c.safetensors", "--model", "moshi-mlx-tests/no-such-repo-5e1d",
               env=hub_env(tmp_path, offline))
    elapsed = time.monotonic() - t0
    line = assert_one_line_error(proc, "moshi-mlx-tests/no-such-repo-5e1d")
    assert elapsed < limit, elapsed
    assert "Retrying" not in proc.stderr and "huggingface-cli" not in line
    if offline:
        assert "HF_HUB_OFFLINE" in line and "hf download moshi-mlx-tests/no-such-repo-5e1d --local-dir" in line
    assert not (tmp_path / "c.safetensors").exists()


def test_offline_uses_the_cache(tmp_path):
    """With HF_HUB_OFFLINE=1 (or no answer from the hub) a downloaded repo still resolves."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hf-home" / "hub" / "models--someorg--cached"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    code = """
from moshi_mlx.checkpoints import hub
print(hub.list_files("someorg/cached"), hub.resolve_file("someorg/cached", "config.json").read_text())
"""
    from moshi_mlx.checkpoints.hub import _hub_unreachable

    # Without network (as here) the probe fails and the cache is used without HF_HUB_OFFLINE too.
    for offline in (True, False) if _hub_unreachable() else (True,):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=hub_env(tmp_path, offline))
        assert proc.returncode == 0 and proc.stdout.strip() == "['config.json'] {}", proc.stderr
        assert proc.stderr == ""


def test_the_suggested_download_command_exists():
    hf = Path(sys.executable).parent / "hf"
    assert hf.exists(), "huggingface_hub's `hf` command is missing"
    proc = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--local-dir" in proc.stdout


# 4. Inputs are checked before the model loads ----------------------------------------------

def test_inputs_are_checked_before_the_model(tmp_path, wav):
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 24000)
    out = tmp_path / "out.safetensors"
    for bad, fragment in [("missing.wav", "no such audio file"), ("bad.wav", "cannot decode audio"),
                          ("empty.wav", "no audio samples")]:
        proc = cli("encode", tmp_path / bad, out, "--model", NO_SUCH_MODEL)
        line = assert_one_line_error(proc, bad, fragment)
        assert "mimi-model-dir" not in line
        proc = cli("chat", "--input-file", tmp_path / bad, "--output-file", tmp_path / "o.wav", "--model",
                   NO_SUCH_MODEL)
        line = assert_one_line_error(proc, bad, fragment)
        assert "mimi-model-dir" not in line
    proc = cli("decode", tmp_path / "missing.safetensors", tmp_path / "o.wav", "--model", NO_SUCH_MODEL)
    assert_one_line_error(proc, "missing.safetensors", "no such codes file")
    assert not out.exists() and not (tmp_path / "o.wav").exists() and no_partial_files(tmp_path)


# 5. Codes files work from any directory --------------------------------------------------

def test_decode_from_another_directory(tmp_path, kyutai_mimi):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "models").mkdir(parents=True)
    b.mkdir()
    shutil.copy(kyutai_mimi[1], a / "models" / "mimi.safetensors")
    sf.write(a / "in.wav", (0.1 * np.random.default_rng(1).standard_normal(6000)).astype(np.float32), 24000)
    proc = cli("encode", "in.wav", "codes.safetensors", "--model", "models/mimi.safetensors", "-n", "4", "--quiet",
               cwd=a)
    assert proc.returncode == 0, proc.stderr
    with safe_open(str(a / "codes.safetensors"), framework="numpy") as f:
        assert f.metadata()["model"] == str((a / "models" / "mimi.safetensors").resolve())
    proc = cli("decode", a / "codes.safetensors", "out.wav", "--quiet", cwd=b)
    assert proc.returncode == 0, proc.stderr
    assert sf.info(str(b / "out.wav")).frames == 6000


def test_decode_hints_model_when_the_recorded_one_is_gone(tmp_path):
    codes = tmp_path / "codes.safetensors"
    save_file({"audio_codes": np.zeros((1, 8, 3), np.int32)}, str(codes),
              metadata={"model": "/gone/mimi.safetensors", "num_samples": "5760"})
    proc = cli("decode", codes, tmp_path / "out.wav")
    assert_one_line_error(proc, "/gone/mimi.safetensors", "--model")
    assert not (tmp_path / "out.wav").exists()


# 6. convert's quantization arguments ------------------------------------------------------

def test_convert_bad_group_size_is_one_line(tmp_path, chat_model_dir):
    proc = cli("convert", chat_model_dir, "-o", tmp_path / "out", "--q-group-size", "7")
    assert_one_line_error(proc, "32, 64, 128", "7")
    assert not (tmp_path / "out").exists()


def test_convert_api_bad_quantization_is_input_error(tmp_path, chat_model_dir):
    from moshi_mlx.convert.convert import convert

    with pytest.raises(InputError, match="32, 64 or 128"):
        convert(chat_model_dir, tmp_path / "out", quantize=True, q_bits=8, q_group_size=7)
    assert not (tmp_path / "out").exists()


def test_convert_q_bits_implies_quantize_and_output_respects_umask(tmp_path, chat_model_dir):
    out = tmp_path / "out"
    proc = cli("convert", chat_model_dir, "-o", out, "--q-bits", "8", umask=0o022)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"bits": 8, "group_size": 64}
    assert (out / "model.q8.safetensors").exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# 7. chat's argument ranges ----------------------------------------------------------------

@pytest.mark.parametrize("args", [["--max-minutes", "-0.6"], ["--max-minutes", "0"], ["--max-minutes", "nan"],
                                  ["--temp", "-1"], ["--temp", "nan"], ["--temp-text", "-0.1"],
                                  ["--temp-text", "inf"], ["--top-k", "-1"], ["--top-k-text", "-5"],
                                  ["--top-k", "2.5"], ["--top-p", "1.5"], ["--top-p-text", "-0.1"]])
def test_chat_refuses_out_of_range_arguments(args, capsys):
    from moshi_mlx.cli import build_parser

    argv = ["chat", *args]
    with pytest.raises(SystemExit) as e:
        build_parser(argv).parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: moshi-mlx chat: argument " + args[0]), err


def test_chat_accepts_valid_sampling_arguments():
    from moshi_mlx.cli import build_parser

    argv = ["chat", "--temp", "0", "--temp-text", "1.2", "--top-k", "0", "--top-p", "0.9", "--top-p-text", "1",
            "--max-minutes", "0.5"]
    args = build_parser(argv).parse_args(argv)
    assert (args.temp, args.top_k, args.top_p, args.top_p_text, args.max_minutes) == (0, 0, 0.9, 1.0, 0.5)


def test_chat_top_p_reaches_the_sampler(chat_model_dir, monkeypatch):
    import importlib

    from moshi_mlx.apps.chat import load_session
    from moshi_mlx.cli import build_parser

    seen = {}
    real = moshi_mlx.DuplexSession

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)  # the real session accepts them

    for name in ("moshi_mlx.sessions.duplex",):
        monkeypatch.setattr(importlib.import_module(name), "DuplexSession", spy)
    argv = ["chat", "--model", str(chat_model_dir), "--top-p", "0.9", "--top-p-text", "0.8"]
    load_session(build_parser(argv).parse_args(argv))
    assert seen["top_p"] == 0.9 and seen["top_p_text"] == 0.8


# 8. No audio devices ----------------------------------------------------------------------

def test_list_devices_without_any_says_why(tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    (tmp_path / "client.conf").write_text("autospawn = no\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "PIPEWIRE_"))}
    env.update(XDG_RUNTIME_DIR=str(runtime), PULSE_RUNTIME_PATH=str(runtime / "pulse"),
               PULSE_SERVER=f"unix:{runtime}/no-server", PULSE_CLIENTCONFIG=str(tmp_path / "client.conf"))
    count = subprocess.run([sys.executable, "-c", "import sounddevice as sd; print(len(sd.query_devices()))"],
                           env=env, capture_output=True, text=True)
    assert count.returncode == 0, count.stderr
    proc = cli("chat", "--list-devices", env=env)
    if int(count.stdout) == 0:  # the case under test: PortAudio sees nothing
        assert_one_line_error(proc, "no audio devices found", "PortAudio", "--input-file")
        assert proc.stdout.strip() == ""
    else:  # a machine with a sound card: the list itself
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


# 9. The umask -------------------------------------------------------------------------------

def test_outputs_respect_the_umask(tmp_path, wav, codes_file):
    proc = cli("decode", codes_file, tmp_path / "out.wav", "--quiet", umask=0o022)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "out.wav").stat().st_mode) == 0o644
    from types import SimpleNamespace

    from moshi_mlx.apps.chat import _Recorder
    from moshi_mlx.audio import write_wav

    old = os.umask(0o027)
    try:
        write_wav(tmp_path / "api.wav", np.zeros(100, np.float32), 24000)
        recorder = _Recorder(tmp_path / "rec.wav", 24000)
        recorder.write(np.zeros(1920, np.float32), SimpleNamespace(pcm=np.zeros(1920, np.float32)))
        recorder.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "api.wav").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "rec.wav").stat().st_mode) == 0o640


# 10. Output formats follow the extension ------------------------------------------------

@pytest.mark.parametrize("ext,fmt", [(".flac", "FLAC"), (".mp3", "MP3"), (".ogg", "OGG"), (".wav", "WAV")])
def test_decode_writes_the_format_the_extension_names(tmp_path, codes_file, ext, fmt):
    out = tmp_path / f"out{ext}"
    proc = cli("decode", codes_file, out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    info = sf.info(str(out))
    assert info.format == fmt and info.samplerate == 24000
    pcm, _ = sf.read(str(out), dtype="float32")
    assert len(pcm) > 0


def test_unknown_output_extension_is_refused_before_any_work(tmp_path, codes_file, wav):
    proc = cli("decode", codes_file, tmp_path / "out.xyz", "--model", NO_SUCH_MODEL)
    assert_one_line_error(proc, "out.xyz", ".wav", ".flac", ".ogg", ".mp3")
    for option in ("--output-file", "--record"):
        proc = cli("chat", "--input-file", wav, option, tmp_path / "out.xyz", "--model", NO_SUCH_MODEL)
        assert_one_line_error(proc, "out.xyz", ".mp3")
    from moshi_mlx.audio import write_wav

    with pytest.raises(InputError, match="cannot write"):
        write_wav(tmp_path / "api.xyz", np.zeros(10, np.float32), 24000)
    assert not [p for p in tmp_path.iterdir() if "xyz" in p.name]


# 11. Truncated input, notices under a progress bar and --quiet ---------------------------------

def test_truncated_wav_is_encoded_with_a_warning(tmp_path, kyutai_mimi):
    sf.write(tmp_path / "full.wav", (0.1 * np.random.default_rng(2).standard_normal(48000)).astype(np.float32),
             24000, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    proc = cli("encode", tmp_path / "cut.wav", tmp_path / "c.safetensors", "--model", kyutai_mimi[1], "-n", "2",
               "--quiet")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith("warning:")]
    assert len(warnings) == 1 and "cut.wav" in warnings[0] and "truncated" in warnings[0], proc.stderr
    proc = cli("encode", tmp_path / "full.wav", tmp_path / "d.safetensors", "--model", kyutai_mimi[1], "-n", "2")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("quiet", [False, True])
def test_downmix_notice_survives_progress_and_quiet(tmp_path, kyutai_mimi, quiet):
    pcm = (0.1 * np.random.default_rng(3).standard_normal(24000)).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", np.stack([pcm, pcm], 1), 24000)
    proc = cli("encode", tmp_path / "stereo.wav", tmp_path / "c.safetensors", "--model", kyutai_mimi[1], "-n", "2",
               *(["--quiet"] if quiet else []))
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith("note:")]
    assert len(notes) == 1 and "downmixing to mono" in notes[0], proc.stderr


# 12. File-mode chat: progress, and Ctrl-C keeps what was made ---------------------------------

def test_file_chat_progress_and_ctrl_c_keeps_the_audio(tmp_path, chat_model_dir):
    seconds = 90.0
    noise = (0.05 * np.random.default_rng(4).standard_normal(int(seconds * 24000))).astype(np.float32)
    sf.write(tmp_path / "in.wav", noise, 24000)
    out, both = tmp_path / "out.wav", tmp_path / "both.flac"
    proc = subprocess.Popen([sys.executable, "-m", "moshi_mlx", "chat", "--model", str(chat_model_dir), "--input-file",
                             str(tmp_path / "in.wav"), "--output-file", str(out), "--record", str(both),
                             "--quiet-text"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stderr:  # model loading first; then a first progress line once frames flow
            lines.append(line)
            if line.startswith("progress:") or time.monotonic() > deadline:
                break
        assert any(line.startswith("progress:") for line in lines), "".join(lines)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(lines) + rest
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and re.search(r"interrupted: kept the first [\d.]+ s of 90.0 s", stderr), stderr
    kept, rate = sf.read(str(out), dtype="float32")
    assert rate == 24000 and 0 < len(kept) < len(noise) and len(kept) % 1920 == 0
    stereo, _ = sf.read(str(both), dtype="float32")
    assert stereo.shape == (len(kept), 2)
    assert no_partial_files(tmp_path)


def _bench_refusal(*args: str) -> str:
    """`moshi-mlx bench ARGS…`'s stderr, checked to be a one-line usage error and nothing else."""
    proc = subprocess.run([sys.executable, "-m", "moshi_mlx", "bench", *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout
    return proc.stderr


def test_bench_only_unknown_is_refused():
    """`bench mimi --only bogus` used to exit 0 with an empty table."""
    err = _bench_refusal("mimi", "--only", "bogus")
    assert "bogus" in err and "moshi_mlx" in err


def test_bench_torch_device_outside_asr_tts_is_refused():
    """--torch-device moves the PyTorch rows of `bench asr` and `bench tts` only; elsewhere it
    would be silently ignored."""
    err = _bench_refusal("lm", "--torch-device", "cuda")
    assert "--torch-device" in err and "asr" in err


def test_bench_rows_say_where_they_ran():
    """On the CPU backend the rows keep their plain names; PyTorch rows on CUDA say so."""
    from moshi_mlx.apps.bench import asr, tts
    from moshi_mlx.apps.bench.common import impl_name

    cpu_rows = asr.rows_for("1b") + tts.rows()
    assert {impl_name(j) for j in cpu_rows} == {"moshi_mlx", "moshi (PyTorch)"}
    assert asr.rows_for("1b")[0].label == "stt-1b fp32"  # full precision is float32 on the CPU backend
    cuda = [j for j in asr.rows_for("2.6b", "cuda") + tts.rows("cuda") if not j.uses_moshi_mlx]
    assert cuda and {impl_name(j) for j in cuda} == {"moshi (PyTorch, cuda)"}
