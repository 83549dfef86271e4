"""The aiohttp application of `moshi-mlx serve`: our web page at `/`, Kyutai's duplex
protocol at `/api/chat`, and `/api/health`.

Security: websocket requests from a browser carry an Origin; only the server's own page (and
`--allow-origin` values) may open a session, so that another site open in the user's browser
cannot drive the local model. The page's own origin is `scheme://Host`, accepted only when
Host is an address or `localhost` or the `--host` name: a DNS-rebinding page has its own
domain name as Host. Clients that are not browsers send no Origin and are accepted.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from . import protocol as P
from .state import HARD_MAX_MESSAGE_BYTES, HEARTBEAT_SECONDS, STATE, ServerConfig, ServerState, Service
from .worker import ModelWorker

log = logging.getLogger("moshi_mlx.serve")

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
# With `?stats=1` (our page), the session's counters go to the client as METADATA this often;
# Kyutai's clients never ask (their Python client would log each as an unknown kind).
STATS_EVERY_S = 1.0
# Kyutai's web client's query parameters → LMGen arguments.
QUERY_PARAMS = {
    "text_temperature": ("temp_text", float, 0.0, 10.0),
    "text_topk": ("top_k_text", int, 0, 1_000_000),
    "audio_temperature": ("temp", float, 0.0, 10.0),
    "audio_topk": ("top_k", int, 0, 1_000_000),
    # One seed drives both samplers here: audio_seed, read last, wins when both are given.
    "text_seed": ("seed", int, 0, 2**63 - 1),
    "audio_seed": ("seed", int, 0, 2**63 - 1),
}




def make_app(config: ServerConfig, worker: ModelWorker) -> web.Application:
    from . import services
    from .speech import MAX_UPLOAD_BYTES

    # Request bodies: whole audio files for the transcription endpoints.
    app = web.Application(client_max_size=MAX_UPLOAD_BYTES, middlewares=[_headers])
    state = ServerState(config, worker)
    for name, model in (("chat", worker.model), ("stt", worker.speech.get("stt")), ("tts", worker.speech.get("tts"))):
        if model is not None:
            state.services[name] = Service(name, model, config.max_sessions)
    app[STATE] = state
    app.router.add_get("/", index)
    app.router.add_get("/api/chat", chat)
    app.router.add_get("/api/health", health)
    app.router.add_static("/assets/", WEB_DIR, follow_symlinks=False)
    services.add_routes(app)
    return app


@web.middleware
async def _headers(request: web.Request, handler):
    response = await handler(request)
    if request.path == "/" or request.path.startswith("/assets/"):
        response.headers["Cache-Control"] = "no-cache"
        # The page loads only its own files (the Opus workers compile WebAssembly).
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self' ws: wss:; "
            "img-src 'self' data: blob:; media-src 'self' blob:; worker-src 'self'; style-src 'self'")
    return response


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html")


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    stats = state.worker.stats
    return web.json_response({
        "status": "ok",
        "model": state.config.model_name,
        "services": {name: {"active": s.active, "max": s.max_sessions, "refused_busy": s.refused}
                     for name, s in state.services.items()},
        "sessions": {"active": sum(s.active for s in state.services.values()), "max": state.config.max_sessions,
                     "opened": stats.sessions_opened,
                     "refused_busy": sum(s.refused for s in state.services.values()),
                     "refused_origin": state.refused_origin, "protocol_errors": state.protocol_errors},
        "frames": stats.frames,
        "step_ms": round(stats.step_ms, 2),
        "dropped_input_frames": stats.dropped_in + sum(getattr(c.engine, 'dropped_in', 0) for c in list(state.worker.channels.values())),
        "uptime_s": round(time.monotonic() - state.started, 1),
    }, dumps=lambda o: json.dumps(o, indent=1))


def origin_allowed(request: web.Request, config: ServerConfig) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:  # not a browser (browsers always send it on websockets)
        return True
    if origin in config.allow_origins or "*" in config.allow_origins:
        return True
    parts = urlsplit(origin)
    if parts.scheme != request.scheme or parts.netloc != request.host:  # not our own page
        return False
    return _trusted_host_name(parts.hostname or "", config.host)


def _trusted_host_name(name: str, bound_host: str) -> bool:
    if name in ("localhost", bound_host):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def gen_overrides(query) -> dict:
    """LMGen arguments from Kyutai's query parameters; other parameters are ignored (as
    Kyutai's servers do: pad_mult, repetition_penalty…). A bad value raises ValueError."""
    out: dict = {}
    for name, (arg, kind, low, high) in QUERY_PARAMS.items():
        text = query.get(name)
        if text is None or text == "":
            continue
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"query parameter {name}={text!r} is not a {kind.__name__}") from None
        if not low <= value <= high:  # NaN fails too
            raise ValueError(f"query parameter {name}={text!r} is out of range [{low}, {high}]")
        out[arg] = value
    return out


async def chat(request: web.Request) -> web.StreamResponse:
    """One duplex conversation over Kyutai's protocol (see protocol.py)."""
    state = request.app[STATE]
    config = state.config
    if not origin_allowed(request, config):
        state.refused_origin += 1
        log.warning("refused a websocket from Origin %s", request.headers.get("Origin"))
        return web.Response(status=403, text="websocket Origin not allowed (see moshi-mlx serve --allow-origin)\n")
    ws = web.WebSocketResponse(max_msg_size=HARD_MAX_MESSAGE_BYTES, heartbeat=HEARTBEAT_SECONDS)
    await ws.prepare(request)
    service = state.services.get("chat")
    if service is None:
        await _refuse(ws, "no conversation model loaded on this server (moshi-mlx serve --model REPO|DIR)")
        return ws
    if service.active >= config.max_sessions:
        service.refused += 1
        await _refuse(ws, f"busy: the server already runs {config.max_sessions} session(s) "
                          "(moshi-mlx serve --max-sessions); try again later", code=1013)
        return ws
    try:
        overrides = gen_overrides(request.query)
    except ValueError as e:
        await _refuse(ws, str(e))
        return ws
    service.active += 1
    try:
        await _converse(ws, state.worker, overrides, state, want_stats=request.query.get("stats") == "1")
    finally:
        service.active -= 1
    return ws


async def _refuse(ws: web.WebSocketResponse, text: str, code: int = 1008) -> None:
    try:
        await ws.send_bytes(P.message(P.ERROR, text))
        await ws.close(code=code, message=text[:120].encode())
    except ConnectionError:
        pass


def _session_stats(channel) -> dict:
    loop = channel.engine
    return {"frames": loop.frames, "dropped_frames": loop.dropped_in, "unsent_frames_dropped": loop.dropped_out,
            "step_ms": round(loop.step_ms, 1)}


async def _converse(ws: web.WebSocketResponse, worker: ModelWorker, overrides: dict, state: ServerState,
                    want_stats: bool = False) -> None:
    import sphn

    max_bytes = state.config.max_message_bytes
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    future = worker.open_chat(overrides, lambda: loop.call_soon_threadsafe(ready.set))
    try:
        channel = await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a parameter the sampler refuses
        await _refuse(ws, f"could not start a session: {e}")
        return
    opus_in = sphn.OpusStreamReader(24000)
    opus_out = sphn.OpusStreamWriter(24000)

    last_stats = 0.0

    async def send_frames() -> None:
        nonlocal last_stats
        while not ws.closed:
            await ready.wait()
            ready.clear()
            while (out := channel.engine.pop_output()) is not None:
                # a frame's text before its audio: a client that has the audio has its words
                if out.text:
                    await ws.send_bytes(P.message(P.TEXT, out.text))
                pages = opus_out.append_pcm(out.pcm)
                if len(pages):
                    await ws.send_bytes(P.message(P.AUDIO, pages))
            if want_stats and time.monotonic() - last_stats >= STATS_EVERY_S:
                last_stats = time.monotonic()
                await ws.send_bytes(P.message(P.METADATA, json.dumps(_session_stats(channel))))

    sender = asyncio.create_task(send_frames())
    try:
        await ws.send_bytes(P.message(P.HANDSHAKE))
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                try:
                    if len(msg.data) > max_bytes:
                        raise P.ProtocolError(f"message of {len(msg.data)} bytes, over the limit of {max_bytes}")
                    kind, payload = P.parse(msg.data)
                    if kind == P.AUDIO:
                        try:
                            pcm = opus_in.append_bytes(payload)
                        except ValueError as e:
                            raise P.ProtocolError(f"audio message is not Ogg/Opus ({e})") from None
                        if len(pcm):
                            worker.push(channel, pcm)
                except P.ProtocolError as e:
                    state.protocol_errors += 1
                    await _refuse(ws, str(e))
                    break
            elif msg.type == WSMsgType.TEXT:
                state.protocol_errors += 1
                await _refuse(ws, "text message where binary was expected (a kind byte, then the payload)")
                break
            elif msg.type == WSMsgType.ERROR:  # e.g. a message over the size limit
                state.protocol_errors += 1
                await _refuse(ws, f"bad message: {ws.exception()}", code=1009)
                break
    except ConnectionError:
        pass
    finally:
        sender.cancel()
        worker.close(channel)
        if not ws.closed:
            await ws.close()
        log.info("session %d closed after %.1f s (%d frames, %d dropped)", channel.id,
                 time.monotonic() - channel.opened, channel.engine.frames, channel.engine.dropped_in)


class NetworkThread(threading.Thread):
    """Serves `app` from its own thread and event loop (the model keeps the main thread).
    `started` is set once listening (`url`) or failed (`error`); `stop()` closes the
    connections and returns once the loop is done."""

    def __init__(self, app: web.Application, host: str, port: int, ssl_context=None):
        super().__init__(name="moshi-mlx-network", daemon=True)
        self.app, self.host, self.port, self.ssl_context = app, host, port, ssl_context
        self.started = threading.Event()
        self.error: str | None = None
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None

    def run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._start())
        except OSError as e:  # address in use, permission denied…
            self.error = e.strerror or str(e)
            self.started.set()
            return
        self.started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    async def _start(self) -> None:
        # Open websockets are closed at shutdown, not awaited.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context).start()
        port = self._runner.addresses[0][1]  # the chosen one when port is 0
        shown = {"127.0.0.1": "localhost", "::1": "[::1]", "0.0.0.0": "localhost"}.get(self.host, self.host)
        self.url = f"{'https' if self.ssl_context else 'http'}://{shown}:{port}/"

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self.join(10)
