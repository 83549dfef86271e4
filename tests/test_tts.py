"""`moshi-mlx tts` and the TextToSpeech API: the script rules (pure), batch == alone,
text pushed word by word == whole text, long texts past the context, the command line end
to end and its errors. Parity with PyTorch is in test_tts_parity.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moshi_mlx.sessions.tts_script import Entry, ScriptParser, StateMachine, TokenIds, script_to_entries

IDS = TokenIds(card=26)


def encode(word: str) -> list[int]:  # a stand-in tokenizer: one token per letter
    return [4 + ord(c) % 20 for c in word]


# -- the script rules (no model) ------------------------------------------------------------------

def test_script_to_entries_follows_kyutai_rules():
    entries = script_to_entries(encode, IDS, ['Hi’s: (you) <break time="1.5s"/> ok', "", "me"],
                                multi_speaker=True, padding_between=1)
    texts = [e.text for e in entries]
    assert texts == ["Hi's", "you", "", "ok", "me"]  # ’ → ', ':' and parentheses dropped
    assert entries[0].tokens[0] == IDS.main and entries[0].tokens[1:] == encode("Hi's")
    assert entries[2] == Entry([], "", 19)  # a 1.5 s break: round(18.75) steps of padding
    assert entries[4].tokens == encode("me")  # turn 2: the main speaker again (turn 1 was empty): no marker
    assert entries[1].padding == len(encode("you"))  # padding_between + len(tokens) - 1
    single = script_to_entries(encode, IDS, ["Hi you"], multi_speaker=False)
    assert single[0].tokens == encode("Hi") and single[0].padding == 0


def test_script_pushed_piece_by_piece_equals_whole():
    text = 'Hello there, <break time="0.5s"/>how are   you?\n(fine) thanks'
    parser = ScriptParser(encode, IDS, True, 1)
    got = []
    for ch in text:  # as an LLM streams: words, tags and spaces cut anywhere
        got += parser.push(ch)
    got += parser.turn(1) + parser.push("and you") + parser.end_turn()
    assert got == script_to_entries(encode, IDS, [text, "and you"], True, 1)


def test_state_machine_forces_words_and_ends():
    machine = StateMachine(IDS, second_stream_ahead=2, max_padding=3, initial_padding=1)
    state = machine.new_state([Entry([7, 8], "ab", 0), Entry([9], "c", 0), Entry([10], "d", 0)])
    outputs = [machine.process(step, state, token=3) for step in range(12)]  # the model only ever pads
    main = [o % IDS.card for o in outputs]
    second = [o // IDS.card - 1 for o in outputs]
    # forced to start a word once max_padding pads ran out; the word's tokens follow on the main
    # stream, the "new word" marker and the word two ahead ("d") on the second stream
    # (initial padding 1, then a word every max_padding + 1 steps)
    assert state.transcript == [("ab", 1), ("c", 5), ("d", 9)]
    assert second[1] == IDS.new_word and main[1:3] == [7, 8] and second[2] == 10
    assert state.end_step is None
    for step in range(12, 16):
        machine.process(step, state, token=3)
    assert state.end_step == 13 and not state.entries


def test_bad_scripts_and_configs_are_refused():
    from moshi_mlx.errors import CheckpointError, InputError
    from moshi_mlx.sessions.tts import TtsConfig

    ok = {"model_type": "tts", "dep_q": 8, "tts_config": {"audio_delay": 1.28, "second_stream_ahead": 2},
          "demux_second_stream": True,
          "conditioners": {"cfg": {"type": "lut", "lut": {"possible_values": ["1.0", "2.0"]}}}}
    cfg = TtsConfig.from_config(ok)
    assert cfg.delay_steps == 16 and cfg.cfg_values == (1.0, 2.0)
    with pytest.raises(InputError, match="4"):
        cfg.check_cfg(4.0)
    with pytest.raises(InputError, match="transcribe"):
        TtsConfig.from_config({**ok, "model_type": "stt"})
    with pytest.raises(CheckpointError, match="tts_config"):
        TtsConfig.from_config({k: v for k, v in ok.items() if k != "tts_config"})
    with pytest.raises(CheckpointError, match="demux"):
        TtsConfig.from_config({**ok, "demux_second_stream": False})


# -- the model (tiny random TTS) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tts(tts_model_dir):
    from moshi_mlx.sessions.tts import TextToSpeech

    return TextToSpeech.from_pretrained(tts_model_dir)


def voices_of(tts_model_dir: Path) -> list[Path]:
    return sorted((tts_model_dir.parent / (tts_model_dir.name + "-voices")).glob("*.safetensors"))


def test_batch_equals_one_by_one(tts, tts_model_dir):
    v0, v1 = voices_of(tts_model_dir)
    scripts = [["The rabbit lived in the forest."], ["Hello there.", "How are you today?"], ["Hi."]]
    voices = [str(v0), [str(v0), str(v1)], None]
    batch = tts.synthesize_batch(scripts, voices, temp=0.0)
    for script, voice, got in zip(scripts, voices, batch):
        alone = tts.synthesize(script, voice, temp=0.0)
        np.testing.assert_array_equal(got.codes, alone.codes)
        assert [(w.text, w.start, w.end) for w in got.words] == [(w.text, w.start, w.end) for w in alone.words]
        np.testing.assert_allclose(got.pcm, alone.pcm, atol=1e-6)
    assert len(batch[2].pcm) < len(batch[0].pcm)  # each item ends at its own end


def test_text_pushed_while_speaking_equals_whole_text(tts, tts_model_dir):
    text = "Hello there, how are you today? <break time=\"0.4s\"/> The rabbit lived in the forest."
    whole = tts.synthesize(text, str(voices_of(tts_model_dir)[0]), temp=0.6, seed=3)
    stream = tts.stream(str(voices_of(tts_model_dir)[0]), temp=0.6, seed=3)
    pcm, first_audio_at = [], None
    words = text.split(" ")
    for i, w in enumerate(words):  # one word at a time, as an LLM answers
        stream.push(w + " ")
        for frame in stream.audio():
            pcm.append(frame)
            first_audio_at = i if first_audio_at is None else first_audio_at
    stream.close()
    pcm += list(stream.audio())
    assert first_audio_at is not None and first_audio_at < len(words) - 1  # speech started before the end
    np.testing.assert_array_equal(stream.speech().codes, whole.codes)
    np.testing.assert_allclose(np.concatenate(pcm), whole.pcm, atol=1e-6)


def test_mimi_keeps_only_its_decoder(tts):
    """Speech is only decoded: the encoder's weights are not kept, and asking it to encode says so."""
    from moshi_mlx.errors import InputError

    assert not tts.mimi.has_encoder and "encoder_transformer" not in tts.mimi
    with pytest.raises(InputError, match="only decodes"):
        tts.mimi.encode(np.zeros((1, 1, 1920), np.float32))
    pcm, _ = tts.mimi.decode_step(np.zeros((1, 32, 1), np.int32), tts.mimi.init_state(1))
    assert pcm.shape == (1, 1, 1920)


def test_a_dropped_stream_is_freed_at_once(tts):
    """No reference cycle keeps a stream's caches (and the voice's keys and values) alive
    until the garbage collector's next pass."""
    import gc
    import weakref

    stream = tts.stream(None)
    stream.push("Hello there.")
    stream.close()
    stream.step()
    ref = weakref.ref(stream)
    gc.disable()
    try:
        del stream
        assert ref() is None
    finally:
        gc.enable()


def test_long_text_wraps_the_cache(tts):
    words = ("the rabbit lived in the forest and how are you today " * 4).split()
    speech = tts.synthesize(" ".join(words), temp=0.6, seed=0)
    steps = len(speech.pcm) // 1920 + 16
    assert steps > 10 * 24  # the 24-step context wrapped more than ten times
    assert [w.text for w in speech.words] == words
    starts = [w.start for w in speech.words]
    assert starts == sorted(starts) and speech.words[-1].end <= speech.duration + 1e-9
    assert np.all(np.isfinite(speech.pcm)) and np.abs(speech.pcm).max() <= 1.0
    short = tts.synthesize(" ".join(words[:8]), temp=0.6, seed=0)
    assert short.duration < speech.duration / 2.5


# -- the command line -------------------------------------------------------------------------------

def cli(*args: str, timeout: float = 300, env: dict | None = None, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "moshi_mlx", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, input=stdin)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    return sf.read(str(path), dtype="float32")


def test_cli_text_to_wav_and_words(tts_model_dir, tmp_path):
    short, long = "Hello there.", "Hello there, how are you today? The rabbit lived in the forest."
    durations = []
    for i, text in enumerate((short, long)):
        out, words = tmp_path / f"{i}.wav", tmp_path / f"{i}.json"
        source = [text] if i == 0 else ["--input", "-"]  # the long one from stdin
        r = cli("tts", *source, "-o", str(out), "--words", str(words), "--model", str(tts_model_dir), "--voice", "none",
                "--seed", "1", stdin=None if i == 0 else text)
        assert r.returncode == 0, r.stderr
        pcm, rate = read_wav(out)
        doc = json.loads(words.read_text())
        assert rate == 24000 and np.all(np.isfinite(pcm)) and np.abs(pcm).max() > 0
        assert [w["text"] for w in doc["words"]] == text.split()
        assert all(0 <= w["start"] < w["end"] <= doc["duration"] + 1e-6 for w in doc["words"])
        durations.append(len(pcm) / rate)
        assert abs(doc["duration"] - durations[-1]) < 1e-3
    assert durations[1] > durations[0] + 1.0  # duration grows with the text


def test_cli_jsonl_batch_equals_alone(tts_model_dir, tmp_path):
    v0, v1 = voices_of(tts_model_dir)
    requests = [{"id": "a", "turns": ["Hello there.", "How are you?"], "voices": [str(v0), str(v1)]},
                {"id": "b", "turns": ["The rabbit lived in the forest."], "voices": [str(v1)]}]
    (tmp_path / "req.jsonl").write_text("\n".join(json.dumps(r) for r in requests) + "\n")
    r = cli("tts", "--jsonl", str(tmp_path / "req.jsonl"), "-o", str(tmp_path / "out"), "--model", str(tts_model_dir),
            "--temp", "0")
    assert r.returncode == 0, r.stderr
    from moshi_mlx.sessions.tts import TextToSpeech

    tts = TextToSpeech.from_pretrained(tts_model_dir)
    for req in requests:
        got, _ = read_wav(tmp_path / "out" / f"{req['id']}.wav")
        alone = tts.synthesize(req["turns"], req["voices"], temp=0.0)
        np.testing.assert_allclose(got, np.round(alone.pcm * 32767) / 32768, atol=2 / 32768)
        words = json.loads((tmp_path / "out" / f"{req['id']}.json").read_text())["words"]
        assert [(w["text"], w["start"]) for w in words] == [(w.text, round(w.start, 3)) for w in alone.words]


@pytest.mark.parametrize("args,message", [
    (["", "-o", "OUT.wav"], "nothing to say"),
    (["?! ...", "-o", "OUT.wav"], "nothing to say"),
    (["Hello.", "-o", "OUT.wav", "--voice", "no-such/voice.wav"], "unknown voice"),
    (["Hello.", "-o", "OUT.wav", "--voice", "BADVOICE"], "has shape [1, 512, 10, 1]"),
    (["Hello.", "-o", "OUT.wav", "--cfg", "7"], "cfg 7 is not supported"),
    (["Hello.", "-o", "OUT.txt"], "cannot write '.txt' audio"),
    (["Hello."], "give an output file"),
])
def test_cli_bad_input_one_line_no_file(tts_model_dir, tmp_path, args, message):
    from safetensors.numpy import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"speaker_wavs": np.zeros((1, 512, 10, 1), np.float32)}, str(bad))
    args = [a.replace("OUT", str(tmp_path / "out")).replace("BADVOICE", str(bad)) for a in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = cli("tts", *args, "--model", str(tts_model_dir), env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert not list(tmp_path.glob("out*"))


def test_cli_refuses_a_model_that_is_not_tts(chat_model_dir, stt_model_dir, tmp_path):
    for model, fits in ((chat_model_dir, "chat"), (stt_model_dir, "transcribe")):
        r = cli("tts", "Hello.", "-o", str(tmp_path / "x.wav"), "--model", str(model), timeout=120)
        assert r.returncode == 2 and f"moshi-mlx {fits}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.wav").exists()


def test_convert_q8_quantizes_cross_attention_and_keeps_conditioners(tts_model_dir, tmp_path):
    """`moshi-mlx convert -q --q-bits 8` of a TTS release: cross-attention and every backbone
    and depformer matrix quantized; conditioners and the depformer's low-rank embedding
    projections in float32; it loads as a TTS and speaks every word, close to full precision."""
    import mlx.nn as nn

    from moshi_mlx.sessions.tts import TextToSpeech

    r = cli("convert", str(tts_model_dir), "-o", str(tmp_path / "q8"), "-q", "--q-bits", "8")
    assert r.returncode == 0, r.stderr
    assert "moshi-mlx tts --model DIR" in (tmp_path / "q8" / "README.md").read_text()
    q8 = TextToSpeech.from_pretrained(tmp_path / "q8")
    layer = q8.lm.transformer.layers[0]
    assert all(isinstance(m, nn.QuantizedLinear) for m in (layer.cross_attention.q_proj, layer.cross_attention.kv_proj,
                                                          layer.cross_attention.out_proj, layer.self_attn.in_proj))
    assert isinstance(q8.lm.depformer_in[0], nn.QuantizedLinear)  # (the tiny depformer's 32-wide layers cannot be)
    cond = q8.lm.condition_provider.conditioners
    assert all(type(c.output_proj) is nn.Linear and c.output_proj.weight.dtype.size == 4 for c in cond.values())
    assert type(q8.lm.depformer_emb[0].low_rank) is nn.Linear
    text = "Hello there, how are you today?"
    got = q8.synthesize(text, temp=0.0)
    assert [w.text for w in got.words] == text.split() and np.all(np.isfinite(got.pcm))
    # teacher-forced (the same tokens and voice through both): text logits close to full precision
    import mlx.core as mx

    fp = TextToSpeech.from_pretrained(tts_model_dir)
    tokens = mx.array(np.random.default_rng(0).integers(0, 26, (1, fp.lm.config.num_codebooks, 40)).astype(np.int32))
    voice = str(voices_of(tts_model_dir)[0])
    outs = []
    for model in (fp, q8):
        total, cross, _ = model.lm.conditions([model.conditions(voice, 2.0)])
        outs.append(np.array(model.lm.forward_text(tokens, total, cross)[1]))
    err = np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0])
    assert err < 0.04, err


def test_cli_ctrl_c_keeps_what_was_produced(tts_model_dir, tmp_path):

    from conftest import interrupt

    text = " ".join(["the rabbit lived in the forest and how are you today"] * 30)
    out, story = tmp_path / "long.wav", tmp_path / "story.txt"
    story.write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "moshi_mlx", "tts", "--input", str(story), "-o", str(out),
                             "--model", str(tts_model_dir), "--voice", "none"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # the first progress line: the model is running
    assert line.startswith("progress:"), line
    time.sleep(2.0)
    _, err = interrupt(proc)
    assert proc.returncode == 130, err
    assert "interrupted:" in err
    pcm, rate = read_wav(out)
    assert 0 < len(pcm) / rate < 60  # some speech, far from the whole text's (330 words)


@pytest.mark.devices
def test_cli_play_reaches_the_speakers(pulse, tts_model_dir, tmp_path):
    """--play through a PulseAudio null sink: what its monitor records is the written audio."""
    out, rec = tmp_path / "out.wav", tmp_path / "rec.raw"
    recorder = subprocess.Popen(["parecord", "--device=moshi_sink.monitor", "--rate=24000", "--channels=1",
                                 "--format=float32le", "--raw", str(rec)], env=pulse)
    try:
        r = cli("tts", "Hello there, how are you today? The rabbit lived in the forest.", "-o", str(out), "--play",
                "--model", str(tts_model_dir), "--voice", "none", "--seed", "2", env=pulse)
        assert r.returncode == 0, r.stderr
    finally:
        time.sleep(1.5)  # the monitor delivers the sink's last buffers late on a loaded machine
        recorder.terminate()
        recorder.wait(10)
    pcm, rate = read_wav(out)
    heard = np.fromfile(rec, np.float32)
    assert len(heard) > len(pcm)  # the recorder ran for the whole command
    # normalised cross-correlation: all of the written audio appears in the recording
    n = 1 << int(np.ceil(np.log2(len(heard) + len(pcm))))
    corr = np.fft.irfft(np.fft.rfft(heard, n) * np.conj(np.fft.rfft(pcm, n)), n)
    lag = int(np.argmax(np.abs(corr[: len(heard)])))
    seg = heard[lag:lag + len(pcm)]
    assert len(seg) == len(pcm), (lag, len(heard), len(pcm))
    assert abs(np.dot(seg, pcm)) / (np.linalg.norm(seg) * np.linalg.norm(pcm) + 1e-12) > 0.9
