"""`moshi-mlx serve --stt --tts`: Kyutai's speech websockets as Unmute speaks them, OpenAI's
speech endpoints through the `openai` package, auth, limits and bad input (tiny random
STT and TTS models in Kyutai's release layouts)."""
from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import time
import urllib.request

import msgpack
import numpy as np
import pytest
import soundfile as sf

from conftest import interrupt
from test_serve import Server

pytestmark = pytest.mark.reference
KEY = "public_token"
FRAME = 1920


def pack(message: dict) -> bytes:  # exactly as Unmute's clients
    return msgpack.packb(message, use_bin_type=True, use_single_float=True)


@pytest.fixture(scope="module")
def voices(tts_model_dir):
    return tts_model_dir.parent / (tts_model_dir.name + "-voices")


@pytest.fixture(scope="module")
def server(stt_model_dir, tts_model_dir, voices):
    s = Server("--stt", stt_model_dir, "--tts", tts_model_dir, "--voice-dir", voices, "--api-key", KEY,
               "--seed", "5")
    yield s
    if s.proc.poll() is None:
        interrupt(s.proc, 30)


def run(coro, timeout: float = 180.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- speech to text ---------------------------------------------------------------------------------

async def unmute_stt(url: str, pcm: np.ndarray, headers: dict) -> list[dict]:
    """Unmute's STT client: Ready first, 1920-sample Audio messages (here all at once: the
    server queues up to 30 s), then a Marker and silence in real time until the Marker comes
    back (the flush)."""
    import aiohttp

    got: list[dict] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url + "/api/asr-streaming",
                                                                      headers=headers) as ws:
        first = msgpack.unpackb((await ws.receive()).data)
        assert first == {"type": "Ready"}, first
        for i in range(0, len(pcm), FRAME):
            await ws.send_bytes(pack({"type": "Audio", "pcm": pcm[i:i + FRAME].tolist()}))
        await ws.send_bytes(pack({"type": "Marker", "id": 42}))
        silence = pack({"type": "Audio", "pcm": [0.0] * FRAME})

        async def flush():  # in real time, as Unmute does
            while True:
                await ws.send_bytes(silence)
                await asyncio.sleep(FRAME / 24000)

        flusher = asyncio.create_task(flush())
        try:
            async for msg in ws:
                message = msgpack.unpackb(msg.data)
                got.append(message)
                if message["type"] in ("Marker", "Error"):
                    break
        finally:
            flusher.cancel()
    return got


def test_asr_streaming_as_unmute(server, stt_model_dir, speech):
    from moshi_mlx.sessions.stt import SpeechToText

    pcm = speech[: 50 * FRAME]
    got = run(unmute_stt(server.base, pcm, {"kyutai-api-key": KEY}))
    kinds = [m["type"] for m in got]
    assert kinds[-1] == "Marker" and got[-1]["id"] == 42 and "Error" not in kinds
    steps = [m for m in got if m["type"] == "Step"]
    assert steps and all(len(m["prs"]) == 4 for m in steps)  # the model has 4 VAD heads
    assert [m["step_idx"] for m in steps] == list(range(1, len(steps) + 1))
    # the marker came back once the audio before it (+ the model's delay) was transcribed
    assert len(steps) >= 50 + SpeechToText.from_pretrained(stt_model_dir).config.steps_of_delay
    words = [(m["text"], m["start_time"]) for m in got if m["type"] == "Word"]
    assert words
    offline = SpeechToText.from_pretrained(stt_model_dir).transcribe(pcm).words
    want = [(w.text, pytest.approx(w.start, abs=1e-6)) for w in offline]
    assert words == want[: len(words)] and len(words) >= len(want) - 1


def test_asr_post_and_openai_transcriptions(server, stt_model_dir, speech, tmp_path):
    import openai
    import srt
    import webvtt

    from moshi_mlx.sessions.stt import SpeechToText

    pcm = speech[: 50 * FRAME]
    wav = tmp_path / "in.wav"
    sf.write(wav, pcm, 24000, subtype="FLOAT")
    offline = SpeechToText.from_pretrained(stt_model_dir).transcribe(pcm).words
    request = urllib.request.Request(server.url + "api/asr-streaming", data=wav.read_bytes(), method="POST",
                                     headers={"kyutai-api-key": KEY})
    with urllib.request.urlopen(request, timeout=120) as r:
        posted = json.loads(r.read())
    assert [m["text"] for m in posted if m["type"] == "Word"] == [w.text for w in offline]
    assert [m["start_time"] for m in posted if m["type"] == "Word"] == pytest.approx([w.start for w in offline])

    client = openai.OpenAI(base_url=server.url + "v1", api_key=KEY)
    with wav.open("rb") as f:
        out = client.audio.transcriptions.create(model="stt", file=f, response_format="verbose_json",
                                                 timestamp_granularities=["word"])
    assert [w.word for w in out.words] == [w.text for w in offline]
    assert out.text == " ".join(w.text for w in offline)
    with wav.open("rb") as f:
        assert client.audio.transcriptions.create(model="stt", file=f).text == out.text
    with wav.open("rb") as f:
        subtitles = client.audio.transcriptions.create(model="stt", file=f, response_format="srt")
    cues = list(srt.parse(subtitles))
    assert " ".join(c.content for c in cues).split() == out.text.split()
    with wav.open("rb") as f:
        vtt = client.audio.transcriptions.create(model="stt", file=f, response_format="vtt")
    parsed = webvtt.from_buffer(io.StringIO(vtt))
    assert " ".join(c.text for c in parsed).split() == out.text.split()


# -- text to speech ---------------------------------------------------------------------------------

async def unmute_tts(url: str, pieces: list[str], headers: dict, query: str) -> tuple[list[dict], bool]:
    import aiohttp

    got: list[dict] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/api/tts_streaming?{query}",
                                                                      headers=headers) as ws:
        first = msgpack.unpackb((await ws.receive()).data)
        assert first == {"type": "Ready"}, first
        for piece in pieces:  # as an LLM streams its answer
            await ws.send_bytes(pack({"type": "Text", "text": piece}))
            await asyncio.sleep(0.05)
        await ws.send_bytes(pack({"type": "Eos"}))
        async for msg in ws:
            if msg.type.name != "BINARY":
                break
            got.append(msgpack.unpackb(msg.data))
        closed = ws.closed or (await ws.receive()).type.name in ("CLOSE", "CLOSED", "CLOSING")
    return got, closed


def test_tts_streaming_as_unmute(server, tts_model_dir, voices):
    from moshi_mlx.sessions.tts import TextToSpeech

    text = "Hello there, how are you today? The rabbit lived in the forest."
    pieces = re.findall(r"\S+\s*", text)
    got, closed = run(unmute_tts(server.base, pieces, {"kyutai-api-key": KEY},
                                 "format=PcmMessagePack&voice=v0&cfg_alpha=2.0"))
    assert closed and not [m for m in got if m["type"] == "Error"]
    audio = [m["pcm"] for m in got if m["type"] == "Audio"]
    assert audio and all(len(a) == FRAME for a in audio)
    words = [m for m in got if m["type"] == "Text"]
    want = TextToSpeech.from_pretrained(tts_model_dir).synthesize(text, voice=str(voices / "v0.safetensors"),
                                                                   cfg=2.0, temp=0.6, seed=5)
    assert [w["text"] for w in words] == [w.text for w in want.words]
    assert [w["start_s"] for w in words] == pytest.approx([w.start for w in want.words])
    pcm = np.concatenate([np.asarray(a, np.float32) for a in audio])
    assert len(pcm) == len(want.pcm)
    np.testing.assert_allclose(pcm, want.pcm, atol=1e-6)  # the same codes, decoded alike


def test_openai_speech(server, tts_model_dir, voices):
    import openai

    from moshi_mlx.sessions.tts import TextToSpeech

    client = openai.OpenAI(base_url=server.url + "v1", api_key=KEY)
    text = "Good morning to you."
    wav = client.audio.speech.create(model="tts", voice="v1", input=text, response_format="wav").content
    pcm, rate = sf.read(io.BytesIO(wav), dtype="float32")
    want = TextToSpeech.from_pretrained(tts_model_dir).synthesize(text, voice=str(voices / "v1.safetensors"),
                                                                   cfg=2.0, temp=0.6, seed=5)
    assert rate == 24000 and len(pcm) == len(want.pcm)
    assert np.abs(pcm - want.pcm).max() <= 1.5 / 32768
    raw = client.audio.speech.create(model="tts", voice="v1", input=text, response_format="pcm").content
    assert len(raw) == 2 * len(want.pcm)
    flac = client.audio.speech.create(model="tts", voice="v1", input=text, response_format="flac").content
    assert sf.info(io.BytesIO(flac)).frames == len(want.pcm)
    with pytest.raises(openai.BadRequestError, match="speed"):
        client.audio.speech.create(model="tts", voice="v1", input=text, speed=1.5)
    with pytest.raises(openai.BadRequestError, match="voice"):
        client.audio.speech.create(model="tts", voice="no-such-voice", input=text)


# -- auth, limits, bad input ------------------------------------------------------------------------

def test_auth(server):
    import aiohttp

    async def status(headers=None, query=""):
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"{server.base}/api/asr-streaming{query}", headers=headers) as ws:
                    return msgpack.unpackb((await ws.receive()).data)["type"]
            except aiohttp.WSServerHandshakeError as e:
                return e.status

    assert run(status()) == 401
    assert run(status({"kyutai-api-key": "wrong"})) == 401
    assert run(status(query="?auth_id=wrong")) == 401
    assert run(status({"kyutai-api-key": KEY})) == "Ready"
    assert run(status(query=f"?auth_id={KEY}")) == "Ready"
    request = urllib.request.Request(server.url + "v1/audio/speech", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 401


@pytest.mark.parametrize("bad, needle", [
    ({"type": "Nope"}, "unknown message type"),
    ({"type": "Audio", "pcm": list(range(1920))}, "float"),
    ({"type": "Audio", "pcm": b"\x00\x01" * 960}, "list of float"),
    ({"type": "Marker", "id": "x"}, "integer"),
    ("not msgpack", "msgpack"),
    ({"type": "Audio", "pcm": [0.0] * 140_000}, "over the limit"),
])
def test_asr_bad_input_gets_an_error(server, bad, needle):
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.base}/api/asr-streaming", headers={"kyutai-api-key": KEY}) as ws:
                assert msgpack.unpackb((await ws.receive()).data) == {"type": "Ready"}
                await ws.send_bytes(b"\xc1" if bad == "not msgpack" else pack(bad))
                reply = await ws.receive()
                closing = await ws.receive()
                return msgpack.unpackb(reply.data), closing.type

    reply, closing = run(go())
    assert reply["type"] == "Error" and needle in reply["message"], reply
    assert closing.name in ("CLOSE", "CLOSED", "CLOSING")
    assert server.health()["status"] == "ok"


@pytest.mark.parametrize("case", ["unknown-voice", "text-after-eos", "bad-format"])
def test_tts_bad_input_gets_an_error(server, case):
    import aiohttp

    query = {"unknown-voice": "voice=nobody-here", "text-after-eos": "voice=v0&format=PcmMessagePack",
             "bad-format": "format=Wav"}[case]

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.base}/api/tts_streaming?{query}",
                                          headers={"kyutai-api-key": KEY}) as ws:
                first = msgpack.unpackb((await ws.receive()).data)
                if first["type"] == "Error":
                    return first
                await ws.send_bytes(pack({"type": "Eos"}))
                await ws.send_bytes(pack({"type": "Text", "text": "late words"}))
                async for msg in ws:
                    if msg.type.name == "BINARY":
                        message = msgpack.unpackb(msg.data)
                        if message["type"] == "Error":
                            return message
                return None

    reply = run(go())
    if case == "text-after-eos":
        # the text may arrive after the (empty) synthesis ended and the socket closed: then
        # nothing is left to refuse; otherwise it must be refused
        assert reply is None or "after Eos" in reply["message"]
    else:
        assert reply is not None and reply["type"] == "Error"
        assert ("voice" in reply["message"]) if case == "unknown-voice" else ("format" in reply["message"])
    assert server.health()["status"] == "ok"


def test_busy_and_cycles_keep_memory_flat(server, speech):
    import aiohttp

    async def cycle(check_busy: bool):
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.base}/api/asr-streaming", headers={"kyutai-api-key": KEY}) as ws:
                assert msgpack.unpackb((await ws.receive()).data) == {"type": "Ready"}
                if check_busy:
                    async with session.ws_connect(f"{server.base}/api/asr-streaming",
                                                  headers={"kyutai-api-key": KEY}) as second:
                        reply = msgpack.unpackb((await second.receive()).data)
                        assert reply == {"type": "Error", "message": "no free channels"}
                for i in range(3):
                    await ws.send_bytes(pack({"type": "Audio", "pcm": speech[i * FRAME:(i + 1) * FRAME].tolist()}))

    run(cycle(True))
    for _ in range(5):
        run(cycle(False))
    time.sleep(0.5)
    before = server.rss_mb()
    for _ in range(20):
        run(cycle(False))
    time.sleep(0.5)
    assert server.rss_mb() - before < 25
    deadline = time.time() + 10
    while server.health()["services"]["stt"]["active"] and time.time() < deadline:
        time.sleep(0.1)
    assert server.health()["services"]["stt"]["active"] == 0


def test_non_local_bind_without_key_is_refused(stt_model_dir):
    proc = subprocess.run([sys.executable, "-m", "moshi_mlx", "serve", "--no-browser", "--host", "0.0.0.0",
                           "--stt", str(stt_model_dir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--api-key" in proc.stderr and "loading" not in proc.stderr, proc.stderr


def test_missing_service_is_a_clear_error(server):
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.base}/api/chat") as ws:
                return (await ws.receive()).data

    reply = run(go())
    assert reply[0] == 5 and b"no conversation model" in reply


def test_tts_raw_and_ogg_formats_and_stt_ogg_input(server, speech):
    """The formats the Unmute test does not use: raw float32 frames (the same samples as
    PcmMessagePack), Ogg/Opus pages (decodable, as long), and Ogg/Opus input to the STT."""
    import aiohttp
    import sphn

    text = "Good evening to you all."

    async def tts(fmt: str) -> list[bytes]:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{server.base}/api/tts_streaming?format={fmt}&voice=v0&seed=3",
                headers={"kyutai-api-key": KEY}) as ws:
            assert msgpack.unpackb((await ws.receive()).data) == {"type": "Ready"}
            await ws.send_str(text)  # a plain text frame, then the binary EOS
            await ws.send_bytes(b"\0")
            return [msg.data async for msg in ws if msg.type.name == "BINARY"]

    packed = [msgpack.unpackb(m) for m in run(tts("PcmMessagePack"))]
    want = np.concatenate([np.asarray(m["pcm"], np.float32) for m in packed if m["type"] == "Audio"])
    raw = run(tts("Pcm"))
    assert all(len(m) == 4 * FRAME for m in raw)
    np.testing.assert_array_equal(np.frombuffer(b"".join(raw), np.float32), want)
    pages = run(tts("OggOpus"))
    reader = sphn.OpusStreamReader(24000)
    heard = np.concatenate([reader.append_bytes(p) for p in pages])
    assert len(heard) == len(want) and np.isfinite(heard).all()

    async def stt_ogg() -> list[dict]:
        writer = sphn.OpusStreamWriter(24000)
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{server.base}/api/asr-streaming?auth_id={KEY}") as ws:
            assert msgpack.unpackb((await ws.receive()).data) == {"type": "Ready"}
            for i in range(0, 25 * FRAME, FRAME):
                await ws.send_bytes(pack({"type": "OggOpus", "data": bytes(writer.append_pcm(speech[i:i + FRAME]))}))
            await ws.send_bytes(pack({"type": "Marker", "id": 1}))
            got = []
            async for msg in ws:
                got.append(msgpack.unpackb(msg.data))
                if got[-1]["type"] in ("Marker", "Error"):
                    return got
                await ws.send_bytes(pack({"type": "OggOpus", "data": bytes(writer.append_pcm(np.zeros(FRAME,
                                                                                                      np.float32)))}))
            return got

    got = run(stt_ogg())
    assert got[-1] == {"type": "Marker", "id": 1} and sum(m["type"] == "Step" for m in got) >= 25
