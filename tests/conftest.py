"""Shared fixtures: real speech, and random-weight reference models saved in release layouts.

The references (torch, Kyutai's moshi, transformers) are required by the `reference` tier: if
one is missing its fixtures fail loudly instead of skipping (the README's test command
installs them). Nothing here imports them at import time, so the fast tier runs without them:

    pytest -m "not reference and not devices"

Markers (registered in pyproject.toml): `reference` (needs torch/moshi/transformers),
`devices` (needs PulseAudio and audio devices), `slow`. Besides the marks written in the test
modules, a test is marked `reference` here when it uses a fixture built from the references
(REFERENCE_FIXTURES, directly or through other fixtures), imports them in its body, or when
its module imports them at module level (such a module cannot even be imported without
them). When `-m` deselects `reference`, those modules are not imported at all.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import numpy as np
import pytest

import moshi_mlx  # noqa: F401  - loads the optimized BLAS before anything imports mlx.core

# Fixtures that build models with the PyTorch references.
REFERENCE_FIXTURES = frozenset({"kyutai_mimi", "mlx_mimi", "chat_model_dir"})
# Top-level imports that make a test module part of the reference tier.
REFERENCE_MODULES = frozenset({"torch", "moshi", "transformers", "reference"})
TESTS = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def imports_references(path: Path) -> bool:
    """Whether the module at `path` imports the references at module level, itself or through
    another test module it imports (e.g. `from test_lm_parity import check_logits`)."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError):
        return False
    for node in tree.body:  # module level only: imports inside functions are fixtures' business
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in REFERENCE_MODULES:
                return True
            sibling = TESTS / f"{top}.py"
            if top.startswith("test_") and sibling.exists() and sibling != path and imports_references(sibling):
                return True
    return False


_IDENT = re.compile(r"(?:\w|:|\+|-|\.|\[|\]|\\|/)+")


def _markexpr_excludes_reference(markexpr: str) -> bool:
    """True when `-m markexpr` deselects every test marked `reference`, whatever its other marks."""
    if not markexpr:
        return False
    try:
        from _pytest.mark.expression import Expression

        expr = Expression.compile(markexpr)
    except Exception:  # noqa: BLE001 - pytest internals; when in doubt, collect everything
        return False
    others = sorted({n for n in _IDENT.findall(markexpr) if n not in ("and", "or", "not", "reference")})
    if len(others) > 10:
        return False
    for bits in range(2 ** len(others)):
        true = {"reference"} | {n for i, n in enumerate(others) if bits >> i & 1}
        if expr.evaluate(lambda name, *args, **kwargs: name in true):
            return False
    return True


def pytest_ignore_collect(collection_path: Path, config):
    """Do not import reference-tier modules when they would be deselected anyway (without
    torch they could not be imported)."""
    if (collection_path.suffix == ".py" and collection_path.name.startswith("test_")
            and _markexpr_excludes_reference(config.option.markexpr) and imports_references(collection_path)):
        return True
    return None


@functools.lru_cache(maxsize=None)
def _body_imports_references(function) -> bool:
    """Whether a test function imports the references in its body (`from transformers import …`)."""
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in REFERENCE_MODULES for a in node.names):
            return True
        if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                and node.module.split(".")[0] in REFERENCE_MODULES):
            return True
    return False


def _needs_references(item) -> bool:
    if REFERENCE_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    module = getattr(item, "module", None)
    if module is not None and getattr(module, "__file__", None) and imports_references(Path(module.__file__)):
        return True
    function = getattr(item, "function", None)
    return function is not None and _body_imports_references(function)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _needs_references(item):
            item.add_marker(pytest.mark.reference)


def speech_pcm(seconds: float = 12.0) -> np.ndarray:
    """Real read speech (../shared/audio/bria.mp3), mono 24 kHz float32, `seconds` long."""
    from moshi_mlx.audio import read_audio

    path = TESTS.parents[1] / "shared" / "audio" / "bria.mp3"
    if not path.exists():
        raise FileNotFoundError(f"test audio missing: {path} (see ../shared/audio/README.md)")
    pcm = read_audio(path, 24000).pcm
    return pcm[: int(seconds * 24000)]


def share_file(src, dst) -> None:
    """Puts a read-only fixture file (the 380 MB Mimi release, a tokenizer) into another model
    directory as a hard link, so the suite's disk use does not grow with each directory that
    needs one; a copy where links are impossible (another filesystem). Tests that alter a file
    must copy it instead."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """12 s of real read speech at 24 kHz (150 Mimi frames: past the 250-step attention window)."""
    return speech_pcm(12.0)


@pytest.fixture(scope="session")
def kyutai_mimi(speech, tmp_path_factory):
    """(reference torch model with all 32 codebooks active, path of its release-layout file)."""
    import reference as R

    ref = R.random_kyutai_mimi(speech)
    ref.set_num_codebooks(32)
    path = tmp_path_factory.mktemp("mimi-kyutai") / R.MIMI_RELEASE_NAME
    R.save_kyutai_mimi(ref, path)
    return ref, path


@pytest.fixture(scope="session")
def mlx_mimi(kyutai_mimi):
    return moshi_mlx.MimiModel.from_pretrained(kyutai_mimi[1])


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, kyutai_mimi):
    """A Kyutai-style directory with a tiny random LM, the Mimi release file and a tiny
    sentencepiece tokenizer, named in config.json: what `moshi-mlx chat --model` takes."""
    import json

    import reference as R
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("chat-model")
    kwargs = R.tiny_lm_kwargs()
    R.save_kyutai_lm(R.random_kyutai_lm(kwargs, seed=31), d, kwargs)
    share_file(kyutai_mimi[1], d / kyutai_mimi[1].name)
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(["hello there how are you today", "the rabbit lived in the forest"] * 30))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tok"), vocab_size=25,
                                   model_type="unigram", minloglevel=2)
    corpus.unlink()
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(mimi_name=kyutai_mimi[1].name, tokenizer_name="tok.model")
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="session")
def stt_model_dir(tmp_path_factory, kyutai_mimi, chat_model_dir):
    """A Kyutai-style STT directory (model_type "stt", dep_q 0, 32 codebooks, 4 semantic-VAD
    heads, stt-1b's delay) whose text vocabulary is the tiny tokenizer's, so that random
    weights still spell words."""
    import json

    import reference as R

    d = tmp_path_factory.mktemp("stt-model")
    kwargs = R.tiny_lm_kwargs(text_card=25, n_q=32, dep_q=0, delays=[0] * 33, context=16,
                              extra_heads_num_heads=4, extra_heads_dim=6)
    R.save_kyutai_lm(R.random_kyutai_lm(kwargs, seed=43), d, kwargs)
    share_file(kyutai_mimi[1], d / kyutai_mimi[1].name)
    share_file(chat_model_dir / "tok.model", d / "tok.model")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="stt", mimi_name=kyutai_mimi[1].name, tokenizer_name="tok.model", model_id="test/stt-tiny",
               stt_config={"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
               lm_gen_config={"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50})
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="session")
def tts_model_dir(tmp_path_factory, kyutai_mimi, chat_model_dir):
    """A Kyutai-style TTS directory (model_type "tts", the tiny structure of tts-1.6b-en_fr,
    see reference.tts_kwargs) and two voice files in `voices/` beside it."""
    import reference as R

    d = tmp_path_factory.mktemp("tts-model")
    kwargs = R.tts_kwargs()
    R.save_tts(R.random_tts_lm(kwargs, seed=53), d, kwargs, kyutai_mimi, chat_model_dir / "tok.model")
    voices = d.parent / (d.name + "-voices")
    voices.mkdir()
    for i in range(2):
        R.write_voice(voices / f"v{i}.safetensors", 10 + i)
    return d


@pytest.fixture(scope="session")
def pulse(tmp_path_factory):
    """A PulseAudio server with a null sink whose monitor is the default microphone (the
    environment to run a client in). Needs the packages scripts/test.sh installs."""
    import os
    import shutil
    import subprocess
    import time

    for tool in ("pulseaudio", "pactl", "paplay", "parecord", "espeak-ng"):
        assert shutil.which(tool), f"{tool} missing: run scripts/test.sh (it installs the audio test packages)"
    runtime = tmp_path_factory.mktemp("pulse-runtime")
    os.chmod(runtime, 0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "PULSE_RUNTIME_PATH": str(runtime / "pulse")}
    subprocess.run(["pulseaudio", "-D", "-n", "--exit-idle-time=-1", "--disallow-exit", "--log-target=stderr",
                    "--load=module-native-protocol-unix", "--load=module-null-sink sink_name=moshi_sink"],
                   env=env, check=True, capture_output=True)
    for _ in range(50):
        if subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    subprocess.run(["pactl", "set-default-sink", "moshi_sink"], env=env, check=True)
    subprocess.run(["pactl", "set-default-source", "moshi_sink.monitor"], env=env, check=True)
    yield env
    subprocess.run(["pulseaudio", "--kill"], env=env, capture_output=True)


def wait_for_microphone(proc, env: dict, timeout: float = 120.0) -> None:
    """Wait until `proc` (a client of the `pulse` server) has opened the microphone: model
    loading and warm-up come first. Fails if it exits or takes longer."""
    import subprocess
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.stderr.read()}")
        time.sleep(0.5)
        streams = subprocess.run(["pactl", "list", "short", "source-outputs"], env=env, capture_output=True,
                                 text=True)
        if streams.stdout.strip():
            return
    raise AssertionError(f"the microphone was not opened within {timeout:.0f} s")


def interrupt(proc, timeout: float = 60.0) -> tuple[str, str]:
    """Ctrl-C for a subprocess: SIGINT, then its (stdout, stderr) once it has exited (killed
    and failed if it does not within `timeout`)."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
