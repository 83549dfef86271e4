"""`moshi-mlx serve`: talk to Moshi in the browser.

A local aiohttp server speaking Kyutai's `/api/chat` websocket protocol (so Kyutai's clients
work against it unchanged) and serving our own page at `/`, shipped in the package. The
model runs on the main thread (moshi_mlx.apps.server.worker); the network on a second one.
Ctrl-C stops the server.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import args as check
from .chat import DEFAULT_MODEL

DEFAULT_PORT = 8998
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="talk to Moshi in the browser; STT/TTS services for voice agents",
                       description="Serve Moshi to the browser: our page at /, Kyutai's duplex websocket protocol at "
                                   "/api/chat (Kyutai's clients work unchanged), /api/health. With --stt/--tts, also "
                                   "speech services as Kyutai's moshi-server (/api/asr-streaming, /api/tts_streaming) "
                                   "and OpenAI (/v1/audio/transcriptions, /v1/audio/speech).")
    p.add_argument("--model", "--chat", dest="model", default=None,
                   help="the conversation model (/, /api/chat): converted directory, Kyutai checkpoint directory "
                        f"or repo id (default {DEFAULT_MODEL} unless only --stt/--tts are given)")
    p.add_argument("--stt", default=None, metavar="REPO|DIR",
                   help="serve speech-to-text with this model (/api/asr-streaming, /v1/audio/transcriptions)")
    p.add_argument("--tts", default=None, metavar="REPO|DIR",
                   help="serve text-to-speech with this model (/api/tts_streaming, /v1/audio/speech)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="the speech services accept only clients with this key (kyutai-api-key header, auth_id "
                        "query parameter or Authorization: Bearer); repeatable; required off 127.0.0.1")
    p.add_argument("--voice-dir", type=Path, default=None,
                   help="TTS voices by name from this directory first (NAME.safetensors), then kyutai/tts-voices")
    p.add_argument("--tts-cfg", type=check.number, default=2.0, help="TTS CFG strength (default 2.0; cfg_alpha= per client)")
    p.add_argument("--tts-temp", type=check.temperature, default=0.6, help="TTS temperature (default 0.6)")
    p.add_argument("-q", "--quantize", type=int, choices=[4, 8], default=None,
                   help="quantize a full-precision checkpoint while loading")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=check.port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    p.add_argument("--ssl", type=Path, default=None, metavar="DIR",
                   help="serve https/wss with DIR/cert.pem and DIR/key.pem (browsers give the microphone "
                        "only to https pages or localhost)")
    p.add_argument("--max-sessions", type=check.positive, default=1,
                   help="sessions at once, per service (default 1; each holds its own KV cache)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also accept websockets from this page origin (e.g. https://example.org; '*' = any); "
                        "repeatable")
    p.add_argument("--no-browser", action="store_true", help="do not open the page in the default browser")
    p.add_argument("--temp", type=check.temperature, default=0.8, help="default audio temperature (0 = greedy)")
    p.add_argument("--temp-text", type=check.temperature, default=0.7, help="default text temperature (0 = greedy)")
    p.add_argument("--top-k", type=check.top_k, default=250, help="default audio top-k")
    p.add_argument("--top-k-text", type=check.top_k, default=25, help="default text top-k")
    p.add_argument("--seed", type=int, default=None, help="default random seed")
    p.set_defaults(run=run)


def _ssl_context(directory: Path):
    import ssl

    from moshi_mlx.errors import InputError

    cert, key = directory / "cert.pem", directory / "key.pem"
    for path in (cert, key):
        if not path.is_file():
            raise InputError(f"--ssl {directory}: {path.name} not found (the directory needs cert.pem and key.pem)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except ssl.SSLError as e:
        raise InputError(f"--ssl {directory}: cannot use cert.pem/key.pem ({e.reason or e})") from None
    return context


def _check_port(host: str, port: int) -> None:
    """Refuses a busy port before the model loads (the server binds it again once loaded)."""
    import socket

    from moshi_mlx.errors import InputError

    if port == 0:
        return
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise InputError(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind(address)
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror} (another server? choose another "
                             "--port)") from None


def run(args: argparse.Namespace) -> int:
    import logging

    from moshi_mlx.checkpoints import lm as lm_ckpt
    from moshi_mlx.errors import InputError
    from moshi_mlx.models.loading import load_checkpoint
    from moshi_mlx.sessions.duplex import check_duplex_config

    from .server.app import NetworkThread, ServerConfig, make_app
    from .server.worker import ModelWorker

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # Everything checkable without the weights is checked before they load.
    ssl_context = _ssl_context(args.ssl) if args.ssl is not None else None
    if args.model is None and args.stt is None and args.tts is None:
        args.model = DEFAULT_MODEL
    if args.host not in LOCAL_HOSTS:
        if (args.stt or args.tts) and not args.api_key:
            raise InputError(f"--host {args.host} exposes the speech services to other machines: give at least one "
                             "--api-key")
        print(f"warning: listening on {args.host}: other machines can use this model"
              + ("" if ssl_context else "; browsers there give the microphone only to https pages (--ssl DIR)"),
              file=sys.stderr)
    if args.voice_dir is not None and not args.voice_dir.is_dir():
        raise InputError(f"--voice-dir {args.voice_dir}: not a directory")
    _check_port(args.host, args.port)
    ckpt = None
    if args.model is not None:
        ckpt = lm_ckpt.read(args.model)
        check_duplex_config(ckpt.config, ckpt.source)
    speech = {}
    if args.stt is not None:
        from moshi_mlx.sessions.stt import SpeechToText

        print(f"loading {args.stt} (speech-to-text)…", file=sys.stderr)
        speech["stt"] = SpeechToText.from_pretrained(args.stt, quantize=args.quantize)
    if args.tts is not None:
        from moshi_mlx.sessions.tts import TextToSpeech

        print(f"loading {args.tts} (text-to-speech)…", file=sys.stderr)
        speech["tts"] = TextToSpeech.from_pretrained(args.tts, quantize=args.quantize)
        speech["tts"].config.check_cfg(args.tts_cfg)
    model = None
    if ckpt is not None:
        print(f"loading {args.model}…", file=sys.stderr)
        model = load_checkpoint(ckpt, quantize=args.quantize)
    worker = ModelWorker(model, dict(temp=args.temp, temp_text=args.temp_text, top_k=args.top_k,
                                     top_k_text=args.top_k_text, seed=args.seed), speech=speech)
    if model is not None:
        print("warming up the model…", file=sys.stderr)
        worker.warm_up()
    names = [f"{kind} {name}" for kind, name in (("chat", args.model), ("stt", args.stt), ("tts", args.tts)) if name]
    config = ServerConfig(model_name=", ".join(names), max_sessions=args.max_sessions, host=args.host,
                          allow_origins=tuple(args.allow_origin), api_keys=tuple(args.api_key),
                          voice_dir=args.voice_dir, tts_defaults={"cfg": args.tts_cfg, "temp": args.tts_temp,
                                                                  "seed": args.seed})
    network = NetworkThread(make_app(config, worker), args.host, args.port, ssl_context)
    network.start()
    if not network.started.wait(30) or network.error is not None:
        worker.stop()
        from moshi_mlx.errors import MoshiMlxError

        raise MoshiMlxError(f"cannot listen on {args.host}:{args.port}: {network.error or 'timed out'}")
    url = network.url
    print(f"serving Moshi at {url} (Ctrl-C to stop)", flush=True)
    if not args.no_browser and model is not None:  # the page is the conversation's
        import webbrowser

        webbrowser.open(url)
    try:
        worker.run()  # the model's thread is this one: Ctrl-C arrives here
    except KeyboardInterrupt:
        pass
    finally:
        worker.stop()
        network.stop()
    print("server stopped", file=sys.stderr)
    return 0
