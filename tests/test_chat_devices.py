"""`moshi-mlx chat` through real audio devices: a PulseAudio server with a null sink, whose
monitor is the microphone. Speech (espeak-ng) is played into the sink; the chat runs ~9 s with
a tiny random model; then SIGINT. The test command installs pulseaudio, libasound2-plugins,
libportaudio2 and espeak-ng; a missing one is a failure, not a skip."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from conftest import interrupt, wait_for_microphone

pytestmark = [pytest.mark.devices, pytest.mark.reference]



@pytest.fixture(scope="module")
def model_dir(chat_model_dir):
    return chat_model_dir


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def test_live_chat_through_pulseaudio(pulse, model_dir, tmp_path):
    speech = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), "Hello Moshi, how are you today? Tell me about the forest."],
                   check=True)
    rec = tmp_path / "session.wav"
    chat = subprocess.Popen([sys.executable, "-m", "moshi_mlx", "chat", "--model", str(model_dir), "--record",
                             str(rec), "--temp", "0", "--temp-text", "0"],
                            env=pulse, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_microphone(chat, pulse)
        subprocess.run(["paplay", str(speech)], env=pulse, check=True, timeout=30)  # the user speaks
        time.sleep(1.0)
        # Moshi keeps talking after the user stops: capture the sink to hear it there.
        heard = tmp_path / "sink.wav"
        subprocess.run(["timeout", "3", "parecord", "--device=moshi_sink.monitor", "--file-format=wav", str(heard)],
                       env=pulse)
        time.sleep(0.5)
    finally:
        _, err = interrupt(chat, timeout=30)
    assert chat.returncode == 0, err
    assert "session:" in err and "Traceback" not in err, err
    both, rate = sf.read(rec, dtype="float32")
    assert rate == 24000 and both.shape[1] == 2 and len(both) > 24000 * 3, both.shape
    assert rms(both[:, 0]) > 1e-3, "the microphone (sink monitor) captured nothing"
    assert rms(both[:, 1]) > 1e-4, "Moshi produced silence"
    sink, _ = sf.read(heard, dtype="float32")
    assert rms(np.asarray(sink).reshape(-1)) > 1e-4, "Moshi's audio did not reach the sink"
