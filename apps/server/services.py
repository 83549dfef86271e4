"""The HTTP and websocket handlers of the speech services (protocols: see speech.py), their
authentication (Kyutai's: a `kyutai-api-key` header or an `auth_id` query parameter; also
OpenAI's `Authorization: Bearer KEY`) and their session limits."""
from __future__ import annotations

import asyncio
import hmac
import io
import json

import numpy as np
from aiohttp import WSMsgType, web

from .state import HARD_MAX_MESSAGE_BYTES, HEARTBEAT_SECONDS, STATE
from .speech import (FRAME, OPENAI_SPEECH_FORMATS, RATE, TTS_FORMATS, ClientError, SttEngine,
                     TtsEngine, decode_upload, pack, resolve_voice, unpack)


def add_routes(app: web.Application) -> None:
    app.router.add_route("*", "/api/asr-streaming", asr_streaming)
    app.router.add_get("/api/tts_streaming", tts_streaming)
    app.router.add_post("/v1/audio/transcriptions", openai_transcriptions)
    app.router.add_post("/v1/audio/speech", openai_speech)


def _state(request):
    return request.app[STATE]


def authorized(request: web.Request, keys: tuple[str, ...]) -> bool:
    if not keys:
        return True
    given = request.headers.get("kyutai-api-key") or request.query.get("auth_id")
    bearer = request.headers.get("Authorization", "")
    if given is None and bearer.lower().startswith("bearer "):
        given = bearer[7:].strip()
    return given is not None and any(hmac.compare_digest(given, k) for k in keys)


def _service(request: web.Request, name: str, openai: bool = False):
    """The loaded service, or the HTTP error to answer (no model, no key, a wrong key)."""
    state = _state(request)
    service = state.services.get(name)
    if service is None:
        flag = {"stt": "--stt", "tts": "--tts"}[name]
        raise _error(503, f"no {name.upper()} model loaded on this server (start it with moshi-mlx serve {flag} "
                          "REPO|DIR)", openai)
    if not authorized(request, state.config.api_keys):
        raise _error(401, "missing or wrong API key (kyutai-api-key header, auth_id query parameter or "
                          "Authorization: Bearer)", openai)
    return state, service


def _error(status: int, message: str, openai: bool = False) -> web.HTTPException:
    kind = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 503: web.HTTPServiceUnavailable}[status]
    body = ({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
            if openai else {"type": "Error", "message": message})
    return kind(text=json.dumps(body), content_type="application/json")


async def _run(worker, service, make, on_output=None, opened: asyncio.Future | None = None) -> object:
    """Opens a channel for `make()`'s engine (`opened` gets the engine once it exists), calls
    `on_output(engine)` whenever it has results, until the engine has finished; returns the
    engine. The channel is closed however it ends."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    future = worker.open(make, lambda: loop.call_soon_threadsafe(ready.set), service.name)
    try:
        channel = await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        raise
    if opened is not None:
        opened.set_result(channel.engine)
    try:
        while True:
            await ready.wait()
            ready.clear()
            if on_output is not None:
                await on_output(channel.engine)
            if channel.engine.finished:
                return channel.engine
    finally:
        worker.close(channel)


async def _start(worker, service, make, on_output) -> tuple[asyncio.Task, object]:
    """A `_run` as a task, and its engine once the models' thread has made it."""
    opened = asyncio.get_running_loop().create_future()
    runner = asyncio.create_task(_run(worker, service, make, on_output, opened))
    try:
        await asyncio.wait({runner, opened}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the client left while the session was being made
        runner.cancel()
        raise
    if not opened.done():
        runner.result()  # the engine could not be made: its error
    return runner, opened.result()


class _Slot:
    """A session of a service for the `async with` block, or ClientError('no free channels')."""

    def __init__(self, service):
        self.service = service

    async def __aenter__(self):
        if self.service.active >= self.service.max_sessions:
            self.service.refused += 1
            raise ClientError("no free channels")
        self.service.active += 1
        return self

    async def __aexit__(self, *exc):
        self.service.active -= 1
        return False


# -- /api/asr-streaming -----------------------------------------------------------------------------

async def asr_streaming(request: web.Request) -> web.StreamResponse:
    state, service = _service(request, "stt")
    if request.method == "POST":
        return await _asr_post(request, state, service)
    if request.method != "GET":
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
    ws = web.WebSocketResponse(max_msg_size=HARD_MAX_MESSAGE_BYTES, heartbeat=HEARTBEAT_SECONDS)
    await ws.prepare(request)
    try:
        async with _Slot(service):
            await _asr_session(ws, state, service)
    except ClientError as e:
        await _send_error(ws, str(e))
    return ws


async def _send_error(ws: web.WebSocketResponse, message: str) -> None:
    try:
        if not ws.closed:
            await ws.send_bytes(pack({"type": "Error", "message": message}))
            await ws.close()
    except ConnectionError:
        pass


async def _asr_session(ws: web.WebSocketResponse, state, service) -> None:
    import sphn

    worker, max_bytes = state.worker, 8 * state.config.max_message_bytes  # 512 KiB: 27 s of Audio.pcm

    async def send(engine) -> None:
        while engine.out:
            message = engine.out.popleft()
            if message["type"] == "End":
                return
            await ws.send_bytes(pack(message))

    opus = None
    runner, engine = await _start(worker, service, lambda: SttEngine(service.model), send)
    try:
        await ws.send_bytes(pack({"type": "Ready"}))
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                if len(msg.data) > max_bytes:
                    raise ClientError(f"message of {len(msg.data)} bytes, over the limit of {max_bytes}")
                message = unpack(msg.data)
                kind = message["type"]
                if kind == "Audio":
                    engine.push_audio(_pcm(message.get("pcm")))
                elif kind == "OggOpus":
                    data = message.get("data")
                    if not isinstance(data, bytes):
                        raise ClientError("OggOpus.data must be bytes")
                    opus = opus or sphn.OpusStreamReader(RATE)
                    try:
                        engine.push_audio(opus.append_bytes(data))
                    except ValueError as e:
                        raise ClientError(f"OggOpus.data is not Ogg/Opus ({e})") from None
                elif kind == "Marker":
                    marker = message.get("id")
                    if isinstance(marker, bool) or not isinstance(marker, int):
                        raise ClientError("Marker.id must be an integer")
                    engine.push_marker(marker)
                else:
                    raise ClientError(f"unknown message type {kind!r} (Audio, OggOpus or Marker)")
                worker.wake()
            elif msg.type == WSMsgType.TEXT:
                raise ClientError("text frame where a msgpack (binary) message was expected")
            elif msg.type == WSMsgType.ERROR:
                raise ClientError(f"bad message: {ws.exception()}")
    finally:
        runner.cancel()


def _pcm(value) -> np.ndarray:
    """Audio.pcm: float samples in [-1, 1] at 24 kHz, mono (a list, as Unmute sends)."""
    if not isinstance(value, (list, tuple)):
        raise ClientError("Audio.pcm must be a list of float samples (24 kHz mono, in [-1, 1])")
    if value and not all(isinstance(x, float) for x in value):
        raise ClientError("Audio.pcm must hold float samples in [-1, 1] (24 kHz mono), not integers")
    pcm = np.asarray(value, np.float32)
    if not np.isfinite(pcm).all() or (len(pcm) and np.abs(pcm).max() > 4.0):
        raise ClientError("Audio.pcm must hold finite float samples in [-1, 1] (24 kHz mono)")
    return pcm


async def _asr_post(request: web.Request, state, service) -> web.Response:
    data = await request.read()
    try:
        words, _ = await _transcribe(state, service, decode_upload(data))
    except ClientError as e:
        raise _error(503 if str(e) == "no free channels" else 400, str(e)) from None
    out = []
    for w in words:
        out.append({"type": "Word", "text": w.text, "start_time": w.start})
        out.append({"type": "EndWord", "stop_time": w.end})
    return web.json_response(out)


async def _transcribe(state, service, pcm: np.ndarray):
    """A whole recording → (words with end times, seconds)."""
    from moshi_mlx.sessions.words import Word

    async with _Slot(service):
        engine = await _run(state.worker, service, lambda: SttEngine.for_file(service.model, pcm))
    words: list[Word] = []
    for message in engine.out:
        if message["type"] == "Word":
            words.append(Word(message["text"], message["start_time"]))
        elif message["type"] == "EndWord" and words and words[-1].end is None:
            words[-1].end = message["stop_time"]
    for w in words:
        w.end = w.start if w.end is None else w.end
    return words, len(pcm) / RATE


# -- /api/tts_streaming -----------------------------------------------------------------------------

async def tts_streaming(request: web.Request) -> web.StreamResponse:
    state, service = _service(request, "tts")
    fmt = request.query.get("format", "OggOpus")
    ws = web.WebSocketResponse(max_msg_size=HARD_MAX_MESSAGE_BYTES, heartbeat=HEARTBEAT_SECONDS)
    await ws.prepare(request)
    try:
        if fmt not in TTS_FORMATS:
            raise ClientError(f"unknown format {fmt!r} ({', '.join(TTS_FORMATS)})")
        settings = _tts_settings(request.query, state)
        voice = resolve_voice(request.query.get("voice"), state.config.voice_dir, service.model)
        async with _Slot(service):
            await _tts_session(ws, state, service, fmt, voice, settings)
    except ClientError as e:
        await _send_error(ws, str(e))
    return ws


def _tts_settings(query, state) -> dict:
    out = dict(state.config.tts_defaults)
    for name, arg, kind in (("cfg_alpha", "cfg", float), ("temperature", "temp", float), ("seed", "seed", int)):
        if query.get(name) not in (None, ""):
            try:
                out[arg] = kind(query[name])
            except ValueError:
                raise ClientError(f"{name}={query[name]!r} is not a {kind.__name__}") from None
    if not 0 <= out["temp"] <= 10:
        raise ClientError(f"temperature must be in [0, 10], got {out['temp']}")
    return out


async def _tts_session(ws, state, service, fmt: str, voice, settings: dict) -> None:
    import sphn

    tts = service.model
    try:
        tts.config.check_cfg(settings["cfg"])
        voice_latents = tts.voice(voice)
    except Exception as e:  # noqa: BLE001 - InputError: unknown voice, bad cfg
        raise ClientError(str(e).splitlines()[0]) from None
    opus = sphn.OpusStreamWriter(RATE) if fmt.startswith("OggOpus") else None

    def make():
        return TtsEngine(tts, voice_latents, settings["cfg"], settings["temp"], settings.get("seed"))

    async def send(engine) -> None:
        while engine.out:
            item = engine.out.popleft()
            if item[0] == "audio":
                pcm = item[1].astype(np.float32)
                if fmt == "PcmMessagePack":
                    await ws.send_bytes(pack({"type": "Audio", "pcm": pcm.tolist()}))
                elif fmt == "Pcm":
                    await ws.send_bytes(pcm.tobytes())
                else:
                    pages = opus.append_pcm(pcm)
                    if len(pages):
                        await ws.send_bytes(pack({"type": "OggOpus", "data": pages}) if fmt == "OggOpusMessagePack"
                                            else pages)
            elif item[0] == "word" and fmt.endswith("MessagePack"):
                await ws.send_bytes(pack({"type": "Text", "text": item[1], "start_s": item[2], "stop_s": item[3]}))

    runner, engine = await _start(state.worker, service, make, send)
    receiver = None
    try:
        await ws.send_bytes(pack({"type": "Ready"}))

        async def receive() -> None:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    engine.push_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    if msg.data == b"\0":
                        engine.end_text()
                    else:
                        message = unpack(msg.data)
                        if message["type"] == "Text" and isinstance(message.get("text"), str):
                            engine.push_text(message["text"])
                        elif message["type"] == "Eos":
                            engine.end_text()
                        elif message["type"] == "Voice":
                            raise ClientError("custom voice embeddings are not supported here: pass voice= "
                                              "in the URL")
                        else:
                            raise ClientError(f"unknown message type {message['type']!r} (Text or Eos)")
                elif msg.type == WSMsgType.ERROR:
                    raise ClientError(f"bad message: {ws.exception()}")
                state.worker.wake()
            engine.end_text()  # the client went away: finish (and free the channel)
            state.worker.wake()

        receiver = asyncio.create_task(receive())
        done, _ = await asyncio.wait({runner, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if receiver in done:
            receiver.result()  # a ClientError goes to the client
            await runner
        await ws.close()  # after the last word, as Kyutai's server does
    finally:
        runner.cancel()
        if receiver is not None:
            receiver.cancel()


# -- OpenAI ---------------------------------------------------------------------------------------------

async def openai_transcriptions(request: web.Request) -> web.Response:
    from moshi_mlx.sessions.stt import Transcript

    from ..formats import render

    state, service = _service(request, "stt", openai=True)
    try:
        form = await request.post()
    except (ValueError, web.HTTPException) as e:
        raise _error(400, f"expected a multipart form with a file ({e})", True) from None
    upload = form.get("file")
    if upload is None or not hasattr(upload, "file"):
        raise _error(400, "missing the `file` field (multipart upload of the audio)", True)
    fmt = form.get("response_format", "json")
    if fmt not in ("json", "text", "srt", "vtt", "verbose_json"):
        raise _error(400, f"response_format must be json, text, srt, vtt or verbose_json, got {fmt!r}", True)
    try:
        words, duration = await _transcribe(state, service, decode_upload(upload.file.read()))
    except ClientError as e:
        raise _error(503 if str(e) == "no free channels" else 400, str(e), True) from None
    text = " ".join(w.text for w in words)
    if fmt == "json":
        return web.json_response({"text": text})
    if fmt == "verbose_json":
        return web.json_response({"task": "transcribe", "language": "unknown", "duration": duration, "text": text,
                                  "words": [{"word": w.text, "start": w.start, "end": w.end} for w in words],
                                  "segments": []})
    transcript = Transcript(np.zeros(0, np.int64), text, words, None, [], duration)
    body = render(transcript, fmt, "", "", False)
    return web.Response(text=body, content_type="text/plain" if fmt != "vtt" else "text/vtt")


async def openai_speech(request: web.Request) -> web.Response:
    state, service = _service(request, "tts", openai=True)
    try:
        body = await request.json()
    except ValueError:
        raise _error(400, "the body must be JSON: {\"input\": …, \"voice\": …}", True) from None
    if not isinstance(body, dict):
        raise _error(400, "the body must be a JSON object", True)
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise _error(400, "`input` must be a non-empty string", True)
    fmt = body.get("response_format", "mp3")
    if fmt not in OPENAI_SPEECH_FORMATS:
        raise _error(400, f"response_format {fmt!r} is not supported ({', '.join(OPENAI_SPEECH_FORMATS)})", True)
    speed = body.get("speed", 1.0)
    if speed != 1.0:
        raise _error(400, "`speed` is not supported (Kyutai's TTS speaks at its own pace): leave it at 1.0", True)
    tts = service.model
    try:
        voice = tts.voice(resolve_voice(body.get("voice"), state.config.voice_dir, tts))
    except Exception as e:  # noqa: BLE001 - ClientError or InputError: unknown voice
        raise _error(400, str(e).splitlines()[0], True) from None
    settings = state.config.tts_defaults
    try:
        async with _Slot(service):
            engine = await _run(state.worker, service, lambda: TtsEngine.for_text(
                tts, text, voice=voice, cfg=settings["cfg"], temp=settings["temp"], seed=settings.get("seed")))
    except ClientError as e:
        raise _error(503, str(e), True) from None
    chunks = [item[1] for item in engine.out if item[0] == "audio"]
    pcm = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return web.Response(body=_encode(pcm, fmt), content_type=OPENAI_SPEECH_FORMATS[fmt][2])


def _encode(pcm: np.ndarray, fmt: str) -> bytes:
    if fmt == "pcm":  # OpenAI's: 24 kHz, 16-bit signed little-endian, mono
        return (np.clip(pcm, -1, 1) * 32767).round().astype("<i2").tobytes()
    if fmt == "opus":
        import sphn

        writer = sphn.OpusStreamWriter(RATE)
        frames = -(-len(pcm) // FRAME)
        padded = np.pad(pcm, (0, frames * FRAME - len(pcm)))
        return b"".join(bytes(writer.append_pcm(padded[i * FRAME:(i + 1) * FRAME])) for i in range(frames))
    import soundfile as sf

    container, subtype, _ = OPENAI_SPEECH_FORMATS[fmt]
    out = io.BytesIO()
    sf.write(out, np.clip(pcm, -1, 1), RATE, format=container, subtype=subtype)
    return out.getvalue()

