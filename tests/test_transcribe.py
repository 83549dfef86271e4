"""`moshi-mlx transcribe` and the STT API around it: the word/timestamp rule and end-of-turn
detection on hand-built inputs, subtitle files parsed back by independent parsers, Mimi's
chunked encoding, batch == single, a long input in flat memory, real speech through the
CLI, and bad input.

The model tests use a tiny random STT model saved in Kyutai's release layout
(conftest.stt_model_dir): random weights give meaningless words, so they check structure,
timing and completeness, not the text.
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moshi_mlx.sessions.words import (EndOfTurn, EndWord, TurnConfig, TurnDetector, Word, WordTimer,
                                      words_from_events)
from conftest import share_file

SHARED_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "audio"
FRAME = 1920


def fake_decode(tokens: list[int]) -> str:
    return "".join(chr(ord("a") + t - 10) for t in tokens)  # 10 → "a", 11 → "b", …


def push_all(timer: WordTimer, tokens: list[int]) -> list:
    events = []
    for t in tokens:
        events += timer.push(t)
    return events


def test_word_rule_on_hand_built_tokens():
    """Kyutai's server rule: steps n < delay ignored; a word is emitted when padding or a
    boundary follows its pieces, starting at the last boundary; a boundary at step n ends it
    at (n − delay) / 12.5 s."""
    timer = WordTimer(fake_decode, delay_steps=3)
    #          n:  1   2  3  4   5   6  7  8  9  10  11  12 13
    tokens = [12, 13, 3, 0, 10, 11, 3, 3, 0, 12, 0, 13, 14]
    events = push_all(timer, tokens)
    # n=1, 2 ignored (their pieces never count); n=4: boundary at (4-3)/12.5 = 0.08 s, no word
    # open; n=7: "ab" complete → Word(start 0.08); n=9: EndWord((9-3)/12.5 = 0.48);
    # n=11: "c" complete and ended at (11-3)/12.5 = 0.64.
    assert events == [Word("ab", 0.08), EndWord(0.48), Word("c", 0.48), EndWord(0.64)]
    assert timer.pieces == [13, 14]  # "de" still being said
    tail = timer.finish(end=5.0)  # the audio ends: "de" starts at 0.64, ends at most 1 s later
    assert tail == [Word("de", 0.64), EndWord(pytest.approx(1.64))]
    words = words_from_events(events + tail)
    assert [(w.text, w.start, w.end) for w in words] == [("ab", 0.08, 0.48), ("c", 0.48, 0.64), ("de", 0.64, pytest.approx(1.64))]


def test_word_rule_offset_and_control_tokens():
    """An offline run's silence prefix shifts every time (never below 0); pieces that decode to
    nothing (control tokens) make no word."""
    decode = lambda ts: "" if ts == [1] else fake_decode(ts)  # noqa: E731
    timer = WordTimer(decode, delay_steps=0, offset=0.5)
    events = push_all(timer, [0, 1, 3, 0, 10, 3] + [3] * 10 + [0])
    assert events == [Word("a", 0.0), EndWord(pytest.approx(17 / 12.5 - 0.5))]
    assert timer.finish(end=9.0) == []


def test_stt_config_fields_are_checked():
    """Missing or contradictory config.json fields: one line naming the field."""
    from moshi_mlx.errors import MoshiMlxError
    from moshi_mlx.sessions.stt import SttConfig

    good = {"model_type": "stt", "dep_q": 0, "stt_config": {"audio_delay_seconds": 2.5,
                                                              "audio_silence_prefix_seconds": 1.0}}
    cfg = SttConfig.from_config(good)
    assert (cfg.audio_delay_seconds, cfg.audio_silence_prefix_seconds, cfg.steps_of_delay) == (2.5, 1.0, 31)
    assert SttConfig.from_config({**good, "stt_config": {"audio_delay_seconds": 2.5, "asr_delay_in_tokens": 32}}
                                 ).steps_of_delay == 32
    cases = [({**good, "stt_config": None}, "needs stt_config"),
             ({**good, "stt_config": {"audio_silence_prefix_seconds": 1.0}}, "lacks audio_delay_seconds"),
             ({**good, "stt_config": {"audio_delay_seconds": "soon"}}, "stt_config.audio_delay_seconds"),
             ({**good, "dep_q": 8}, "dep_q is 8"),
             ({**good, "model_type": "moshi"}, "model_type is 'moshi'"),
             ({"model_type": None, "dep_q": 8}, "use `moshi-mlx chat`"),
             ({"model_type": "tts", "dep_q": 16}, "use `moshi-mlx tts`")]
    for config, message in cases:
        with pytest.raises(MoshiMlxError, match=message.replace("(", r"\(")) as e:
            SttConfig.from_config(config)
        assert "\n" not in str(e.value)


def test_turn_detector_follows_unmute():
    """EMA of head 2's pause probability; nothing in the first 12 steps; an end of turn only
    after a word, once per turn."""
    det = TurnDetector(TurnConfig(ignore_steps=12))
    paused = [0.0, 0.0, 0.95, 0.0]
    assert all(det.push(paused, i * 0.08) is None for i in range(12))  # ignored steps
    assert det.push(paused, 1.0) is None  # no word said yet
    det.heard_word()
    assert det.push([0.0, 0.0, 0.1, 0.0], 1.1) is None  # still speaking
    assert det.push(paused, 1.2) == EndOfTurn(1.2)
    assert det.push(paused, 1.3) is None  # the same pause: no second end of turn
    det.heard_word()
    assert det.push(paused, 2.0) == EndOfTurn(2.0)
    # The smoothing is configurable: a 1 s half-life needs several steps to cross 0.6.
    slow = TurnDetector(TurnConfig(half_life=1.0, ignore_steps=0))
    slow.value = 0.0
    slow.heard_word()
    fired = [slow.push(paused, i) for i in range(40)]
    first = next(i for i, e in enumerate(fired) if e is not None)
    assert 5 < first < 20


def test_subtitles_parse_back():
    """SRT and WebVTT from a transcript with pauses and sentence ends, read back by the `srt`
    and `webvtt-py` parsers: every word once, in order; cues ordered, non-overlapping, short;
    the pause and the sentence end start new cues; a long silence is not shown."""
    import io

    import srt
    import webvtt

    from moshi_mlx.apps import formats
    from moshi_mlx.sessions.stt import Transcript

    words, t = [], 0.3
    for i in range(30):
        text = f"word{i}" + ("." if i == 9 else "")
        length = 6.0 if i == 19 else 0.32  # a long pause after word19
        words.append(Word(text, t, t + length))
        t += length
    tr = Transcript(np.zeros(0, np.int64), " ".join(w.text for w in words), words, None, [], t)
    subs = list(srt.parse(formats.to_srt(tr)))
    vtt = webvtt.from_buffer(io.StringIO(formats.to_vtt(tr)))
    for cues in ([(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subs],
                 [(c.start_in_seconds, c.end_in_seconds, c.text) for c in vtt]):
        assert " ".join(c[2] for c in cues).split() == [w.text for w in words]
        assert all(a[1] <= b[0] for a, b in zip(cues, cues[1:]))  # no overlaps
        assert all(c[0] < c[1] <= c[0] + 5 for c in cues)
        assert all(len(c[2]) <= formats.MAX_CHARS for c in cues)
        texts = [c[2] for c in cues]
        assert any(x.endswith("word9.") for x in texts) and any(x.startswith("word10") for x in texts)
        assert any(x.endswith("word19") for x in texts) and any(x.startswith("word20") for x in texts)
        cue19 = next(c for c in cues if c[2].endswith("word19"))
        assert cue19[1] - words[19].start <= formats.LINGER + 1e-3  # not through the 6 s pause


@pytest.fixture(scope="module")
def stt(stt_model_dir):
    from moshi_mlx.sessions.stt import SpeechToText

    return SpeechToText.from_pretrained(stt_model_dir)


def test_chunked_encoding_equals_frame_by_frame(stt):
    """Offline transcription encodes up to 16 frames per Mimi call; its streaming state makes
    that equal to one call per frame (Kyutai's semantics) up to float rounding, past the 250-
    step attention window. Chunks through the plain ring would differ ~20x more."""
    import mlx.core as mx

    from conftest import speech_pcm

    mimi = stt.mimi
    pcm = speech_pcm(24.0)

    def latent(state, frames):
        step = FRAME * frames
        return np.concatenate([np.array(mimi._latent(mx.array(pcm[None, i:i + step, None]), state))
                               for i in range(0, len(pcm) // step * step, step)], 1)

    one = latent(mimi.init_state(1), 1)[:, :288]
    chunked = latent(mimi.init_state(1, max_frames=16), 16)[:, :288]
    plain = latent(mimi.init_state(1), 16)[:, :288]
    scale = np.abs(one).max()
    assert np.abs(one - chunked).max() < 1e-5 * scale
    assert np.abs(one - plain).max() > 20 * np.abs(one - chunked).max()


@pytest.mark.parametrize("shared_encode", [True, False], ids=["one-mimi-encode", "mimi-per-stream"])
def test_batch_equals_single(stt, shared_encode, monkeypatch):
    """Three recordings of different lengths as one batch: the same tokens, VAD
    probabilities, words and turns as one at a time; with one Mimi encode for the batch
    (the CPU kernels: rows computed alone) and with one per stream (elsewhere)."""
    from conftest import speech_pcm

    from moshi_mlx.models.mimi import MimiModel

    if not shared_encode:
        monkeypatch.setattr(MimiModel, "batch_exact", property(lambda self: False))
    assert len(stt.stream(3).mimi_groups) == (1 if shared_encode and stt.mimi.batch_exact else 3)
    pcm = speech_pcm(14.0)
    audios = [pcm[: 24000 * 9], pcm[24000 * 2:], pcm[: 24000 * 4][::-1].copy()]
    batch = stt.transcribe_batch(audios)
    for audio, got in zip(audios, batch):
        alone = stt.transcribe(audio)
        np.testing.assert_array_equal(got.tokens, alone.tokens)
        np.testing.assert_allclose(got.pause_prob, alone.pause_prob, atol=1e-5)
        assert got.words == alone.words and got.end_of_turns == alone.end_of_turns
        assert got.duration == pytest.approx(len(audio) / 24000)
        assert len(got.tokens) == (len(audio) + int(1.5 * 24000)) // FRAME  # delay + 1 s of right padding


def test_stream_equals_transcribe(stt):
    """The live API (any block sizes, then flush) gives the offline transcript's words."""
    from conftest import speech_pcm

    pcm = speech_pcm(8.0)
    stream = stt.stream(keep_history=True)
    events = []
    rng = np.random.default_rng(0)
    i = 0
    while i < len(pcm):
        n = int(rng.integers(100, 9000))
        events += stream.step(pcm[i:i + n])
        i += n
    events += stream.flush()
    offline = stt.transcribe(pcm)
    np.testing.assert_array_equal(np.concatenate([t for t, _ in stream.history]), offline.tokens)
    assert words_from_events(events) == offline.words
    with pytest.raises(Exception, match="flushed"):
        stream.step(pcm[:FRAME])


@pytest.mark.slow
def test_twenty_minutes_in_flat_memory(stt, tmp_path):
    """A 20-minute file (read incrementally): faster than real time with the tiny model, and
    memory after 20 minutes no higher than after the first 5 (plus a small margin)."""
    import soundfile as sf

    from conftest import speech_pcm

    minute = np.resize(speech_pcm(60.0), 60 * 24000)  # the 45 s recording, looped to a minute
    path = tmp_path / "long.flac"
    with sf.SoundFile(path, "w", 24000, 1, format="FLAC") as f:
        for _ in range(20):
            f.write(minute)
    rss = []

    def on_step(steps):
        if steps >= 3750 * (len(rss) + 1):  # every 5 minutes
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    import time

    t0 = time.perf_counter()
    got = stt.transcribe_batch([path], on_step=on_step)[0]
    elapsed = time.perf_counter() - t0
    print(f"\n20 min of audio in {elapsed:.0f} s ({1200 / elapsed:.1f}x real time); peak RSS MB at 5/10/15/20 min:"
          f" {[round(r) for r in rss]}")
    assert got.duration == pytest.approx(1200.0)
    assert len(got.tokens) == (1200 * 24000 + 36000) // FRAME
    assert got.words and got.words[-1].end <= 1200.0
    assert elapsed < 1200
    assert len(rss) == 4 and rss[-1] - rss[0] < 100


def run_cli(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "moshi_mlx.cli", *args], capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_real_speech(stt_model_dir, tmp_path):
    """bria.mp3 (mp3, 44.1 kHz) end to end: JSON with words inside the audio, in order, the
    model id and duration, VAD turns; SRT and VTT written atomically and parseable; two files
    batched into a directory."""
    import srt
    import webvtt

    src = SHARED_AUDIO / "bria.mp3"
    out = tmp_path / "bria.json"
    rc, _, err = run_cli("transcribe", str(src), "--model", str(stt_model_dir), "-o", str(out), "--vad")
    assert rc == 0, err
    assert "real time" in err
    d = json.loads(out.read_text())
    assert d["model"] == "test/stt-tiny" and d["file"] == str(src)
    import soundfile as sf

    assert d["duration"] == pytest.approx(sf.info(str(src)).duration, abs=0.01)
    assert isinstance(d["end_of_turns"], list)
    words = d["words"]
    assert len(words) > 10 and d["text"]
    starts = [w["start"] for w in words]
    assert starts == sorted(starts)
    assert all(0 <= w["start"] <= w["end"] <= d["duration"] + 1e-6 for w in words)
    assert all(w["text"].strip() == w["text"] and w["text"] for w in words)
    # Subtitles, format from the extension; a second file batched with the first.
    short = tmp_path / "short.wav"
    sf.write(short, sf.read(str(src))[0][: 44100 * 5], 44100)
    outdir = tmp_path / "subs"
    rc, _, err = run_cli("transcribe", str(src), str(short), "--model", str(stt_model_dir), "--format", "srt",
                         "-o", str(outdir), "--batch", "2")
    assert rc == 0, err
    assert sorted(p.name for p in outdir.iterdir()) == ["bria.srt", "short.srt"]
    cues = list(srt.parse((outdir / "bria.srt").read_text()))
    assert " ".join(c.content for c in cues).split() == " ".join(w["text"] for w in words).split()
    rc, _, err = run_cli("transcribe", str(short), "--model", str(stt_model_dir), "-o", str(tmp_path / "s.vtt"))
    assert rc == 0, err
    assert list(webvtt.read(str(tmp_path / "s.vtt")))
    rc, text, err = run_cli("transcribe", str(short), "--model", str(stt_model_dir))
    assert rc == 0 and text.strip(), err


def test_cli_bad_input(stt_model_dir, chat_model_dir, tmp_path):
    """One-line errors, exit status 2, no output written, before the model loads."""
    import soundfile as sf

    good = tmp_path / "good.wav"
    sf.write(good, np.random.default_rng(0).normal(0, 0.1, 24000).astype(np.float32), 24000)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(24000, np.float32), 24000)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 24000)
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all")
    locked = tmp_path / "locked.wav"
    shutil.copy(good, locked)
    locked.chmod(0)
    no_tok = tmp_path / "stt-no-tokenizer"
    shutil.copytree(stt_model_dir, no_tok, copy_function=share_file)  # read only, but for the tokenizer removed
    (no_tok / "tok.model").unlink()
    out = tmp_path / "out.json"
    model = ["--model", str(stt_model_dir)]
    cases = [
        ([str(tmp_path / "missing.wav"), *model], "no such audio file"),
        ([str(text), *model], "cannot decode audio"),
        ([str(empty), *model], "no audio samples"),
        ([str(silent), *model], "silent"),
        ([str(good), *model, "--format", "docx"], "invalid choice: 'docx'"),
        ([str(good), "--model", str(no_tok)], "tok.model"),
        ([str(good), "--model", str(chat_model_dir)], "use `moshi-mlx chat`"),
        ([str(good), str(good), *model, "-o", str(tmp_path)], "same name"),
        ([str(good), *model, "--batch", "0"], "must be >= 1"),
        ([str(good), *model, "-o", str(tmp_path / "nowhere" / "x.json")], "does not exist"),
    ]
    if locked.stat().st_mode and not _root():
        cases.append(([str(locked), *model], "cannot read"))
    second = tmp_path / "second.wav"
    shutil.copy(good, second)
    rc, _, err = run_cli("transcribe", str(good), str(second), *model, "--format", "srt")
    assert rc == 2 and "-o DIR" in err, err
    for args, message in cases:
        rc, stdout, err = run_cli("transcribe", *args, "-o", str(out)) if "-o" not in args else run_cli(
            "transcribe", *args)
        assert rc == 2, (args, err)
        assert message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists()
    # The STT model given to chat names the command that fits it.
    rc, _, err = run_cli("chat", "--model", str(stt_model_dir), "--input-file", str(good), "--output-file",
                         str(tmp_path / "o.wav"))
    assert rc == 2 and "SpeechToText" in err and "transcribe" in err, err


def _root() -> bool:
    import os

    return os.geteuid() == 0


@pytest.mark.devices
def test_mic_captions_through_pulseaudio(pulse, stt_model_dir, tmp_path):
    """`transcribe --mic --vad`: speech played into a PulseAudio null sink whose monitor is the
    microphone; words are printed as they are decided; Ctrl-C flushes the last words and
    writes what was said (-o), exit status 0."""
    import time

    from conftest import interrupt, wait_for_microphone

    out = tmp_path / "said.json"
    proc = subprocess.Popen([sys.executable, "-m", "moshi_mlx", "transcribe", "--mic", "--vad", "--model",
                             str(stt_model_dir), "-o", str(out)],
                            env=pulse, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_microphone(proc, pulse)
        clip = tmp_path / "speech.wav"
        import soundfile as sf

        from conftest import speech_pcm

        sf.write(clip, speech_pcm(8.0), 24000)
        subprocess.run(["paplay", str(clip)], env=pulse, check=True, timeout=60)  # the user speaks, 8 s
        time.sleep(1.0)
    finally:
        stdout, err = interrupt(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "listening" in err, err
    said = json.loads(out.read_text())
    assert said["file"] == "microphone" and said["duration"] > 8.0
    assert len(said["words"]) > 3 and "end_of_turns" in said
    assert stdout.split()[:3] == " ".join(w["text"] for w in said["words"]).split()[:3]
    assert all(0 <= w["start"] <= w["end"] <= said["duration"] + 1e-6 for w in said["words"])
