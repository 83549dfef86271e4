"""`moshi-mlx serve`: Kyutai's /api/chat protocol, our page in a real browser, robustness.

One server (a subprocess, as users run it) with a tiny random Moshi whose text vocabulary is
the tiny tokenizer's, so that random weights still spell text; greedy sampling, so that what
comes over the websocket can be compared with file-mode `chat` on the same audio.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import interrupt, share_file
from moshi_mlx.apps.server import protocol as P
from moshi_mlx.apps.server.client import FRAME, converse

pytestmark = pytest.mark.reference
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def serve_model_dir(tmp_path_factory, kyutai_mimi, chat_model_dir):
    import reference as R

    d = tmp_path_factory.mktemp("serve-model")
    kwargs = R.tiny_lm_kwargs(text_card=25, context=250)  # the KV cache wraps every 20 s of conversation
    R.save_kyutai_lm(R.random_kyutai_lm(kwargs, seed=61), d, kwargs)
    share_file(kyutai_mimi[1], d / kyutai_mimi[1].name)
    share_file(chat_model_dir / "tok.model", d / "tok.model")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(mimi_name=kyutai_mimi[1].name, tokenizer_name="tok.model")
    (d / "config.json").write_text(json.dumps(cfg))
    return d


class Server:
    """`moshi-mlx serve ARGS… --port 0 --no-browser` as a user runs it, once it listens."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moshi_mlx", "serve", "--port", "0", "--no-browser", *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # printed once listening (after load and warm-up)
        match = re.search(r"serving Moshi at (https?://\S+)", line)
        if match is None:
            self.proc.kill()
            raise AssertionError(f"no URL printed: {line!r} {self.proc.stderr.read()}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))
        self.base = f"{'wss' if self.url.startswith('https') else 'ws'}://127.0.0.1:{self.port}"
        self.ws = self.base + "/api/chat"

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "api/health", timeout=10) as r:
            return json.loads(r.read())

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@pytest.fixture(scope="module")
def server(serve_model_dir):
    s = Server("--model", serve_model_dir, "--temp", "0", "--temp-text", "0")
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.communicate()


def run(coro, timeout: float = 180.0):
    # A bound on the whole exchange: aiohttp's receive(timeout=) restarts at each of the
    # server's heartbeat pings, so it alone would not stop a hung test.
    return asyncio.run(asyncio.wait_for(coro, timeout))


def file_chat_text(model_dir: Path, pcm: np.ndarray, tmp_path: Path) -> str:
    """What file-mode `chat` prints for this audio (greedy)."""
    sf.write(tmp_path / "in.wav", pcm, 24000, subtype="FLOAT")
    proc = subprocess.run([sys.executable, "-m", "moshi_mlx", "chat", "--model", str(model_dir), "--input-file",
                           str(tmp_path / "in.wav"), "--output-file", str(tmp_path / "out.wav"), "--temp", "0",
                           "--temp-text", "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.rstrip("\n")


def decoded(pages: list[bytes]) -> np.ndarray:
    """The PCM the server decoded from these Ogg pages (same decoder, same chunks)."""
    import sphn

    reader = sphn.OpusStreamReader(24000)
    return np.concatenate([reader.append_bytes(p) for p in pages])


# -- protocol ---------------------------------------------------------------------------------------

def test_our_client_gets_the_text_of_file_mode_chat(server, serve_model_dir, speech, tmp_path):
    pcm = speech[: 75 * FRAME]  # 6 s
    conv = run(converse(server.ws, pcm, window=2))
    assert not conv.errors and conv.handshake_s > 0
    assert conv.frames == 75  # Moshi's audio tracks the input: one 80 ms frame per frame sent
    assert np.isfinite(conv.audio).all() and np.abs(conv.audio).max() > 0.01
    heard = decoded(conv.sent_ogg)
    assert len(heard) == len(pcm)
    text = "".join(conv.text)
    assert len(text.strip()) > 0
    assert text == file_chat_text(serve_model_dir, heard, tmp_path)
    health = server.health()
    assert health["sessions"]["active"] == 0 and health["dropped_input_frames"] == 0


def test_kyutai_python_client_unchanged(server, serve_model_dir, speech, tmp_path):
    """moshi 0.2.13's own client (`moshi.client.Connection`), its audio devices replaced by a
    recording in and a list out: the rest of its code runs as published."""
    import aiohttp
    import moshi.client as kyutai

    pcm = speech[: 50 * FRAME]
    frames = [pcm[i:i + FRAME] for i in range(0, len(pcm), FRAME)]
    tokens: list[str] = []

    class Printer:
        def print_token(self, token):
            tokens.append(token)

        def log(self, level, msg):
            pass

        def print_pending(self):
            pass

        def print_lag(self):
            pass

    class FakeStream:
        def __init__(self, samplerate, channels, blocksize, callback):
            self.callback = callback

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    async def drive():
        import unittest.mock

        with unittest.mock.patch.object(kyutai.sd, "InputStream", FakeStream), \
                unittest.mock.patch.object(kyutai.sd, "OutputStream", FakeStream):
            async with aiohttp.ClientSession() as session, session.ws_connect(server.ws) as ws:
                conn = kyutai.Connection(Printer(), ws, asyncio.get_running_loop())
                task = asyncio.create_task(conn.run())
                loop = asyncio.get_running_loop()
                for i, frame in enumerate(frames):  # the microphone, as fast as the server answers
                    while conn._output_queue.qsize() < i - 1 and not task.done():  # ≤ 2 frames in flight
                        await asyncio.sleep(0.005)
                    await loop.run_in_executor(None, conn._in_stream.callback, frame[:, None].copy(), FRAME, None,
                                               None)
                deadline = time.time() + 30
                while conn._output_queue.qsize() < len(frames) and time.time() < deadline:
                    await asyncio.sleep(0.01)
                await ws.close()
                await task
                return conn._output_queue.qsize()

    received = run(drive())
    assert received == len(frames)  # its output queue holds 1920-sample frames decoded from our Opus
    # the same Opus bytes its writer sent (a fresh writer is deterministic) → what the server heard
    import sphn

    writer = sphn.OpusStreamWriter(24000)
    pages = [p for p in (writer.append_pcm(f) for f in frames) if len(p)]
    assert "".join(tokens) == file_chat_text(serve_model_dir, decoded(pages), tmp_path)
    assert len("".join(tokens).strip()) > 0


# -- robustness -------------------------------------------------------------------------------------

async def _handshake(url: str, session, headers=None):
    ws = await session.ws_connect(url, headers=headers)
    msg = await ws.receive()
    return ws, msg.data


def test_busy_beyond_max_sessions_and_first_unaffected(server, speech):
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as session:
            first, hello = await _handshake(server.ws, session)
            assert hello == P.message(P.HANDSHAKE)
            second, answer = await _handshake(server.ws, session)
            assert answer[0] == P.ERROR and b"busy" in answer
            closing = await second.receive(timeout=10)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            await second.close()
            import sphn

            writer, reader = sphn.OpusStreamWriter(24000), sphn.OpusStreamReader(24000)
            out = np.zeros(0, np.float32)
            for i in range(5):  # one frame at a time (faster would meet the lag control)
                await first.send_bytes(P.message(P.AUDIO, writer.append_pcm(speech[i * FRAME:(i + 1) * FRAME])))
                while len(out) < (i + 1) * FRAME:
                    msg = await first.receive()
                    if msg.data[0] == P.AUDIO:
                        out = np.concatenate([out, reader.append_bytes(msg.data[1:])])
            await first.close()
            return len(out)

    assert run(go()) == 5 * FRAME
    assert server.health()["sessions"]["refused_busy"] >= 1


@pytest.mark.parametrize("bad", ["unknown-kind", "garbage-opus", "oversized", "text-frame", "empty"])
def test_malformed_input_gets_an_error_and_the_server_serves_on(server, bad):
    import aiohttp

    messages = {"unknown-kind": b"\x09hello", "garbage-opus": b"\x01" + b"not ogg at all" * 10,
                "oversized": b"\x01" + bytes(200_000), "text-frame": "hello", "empty": b""}

    async def go():
        async with aiohttp.ClientSession() as session:
            ws, hello = await _handshake(server.ws, session)
            assert hello == P.message(P.HANDSHAKE)
            data = messages[bad]
            await (ws.send_str(data) if isinstance(data, str) else ws.send_bytes(data))
            got = []
            while True:
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                got.append(msg.data)
            assert ws.closed or msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            errors = [m for m in got if m[:1] == bytes([P.ERROR])]
            assert len(errors) == 1, got
            # the next client is served
            again, hello = await _handshake(server.ws, session)
            assert hello == P.message(P.HANDSHAKE)
            await again.close()
            return errors[0][1:].decode()

    message = run(go())
    assert message and "\n" not in message
    assert server.health()["status"] == "ok"


def test_foreign_origin_is_refused(server):
    import aiohttp

    port = server.port

    async def go():
        async with aiohttp.ClientSession() as session:
            for origin, host in ((f"http://evil.example:{port}", None), ("https://evil.example", None),
                                 (f"http://evil.example:{port}", f"evil.example:{port}")):  # DNS rebinding
                headers = {"Origin": origin} | ({"Host": host} if host else {})
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await session.ws_connect(server.ws, headers=headers)
                assert e.value.status == 403
            for origin in (f"http://localhost:{port}", f"http://127.0.0.1:{port}"):  # our own page
                host = origin.split("//")[1]
                ws, hello = await _handshake(server.ws, session, headers={"Origin": origin, "Host": host})
                assert hello == P.message(P.HANDSHAKE)
                await ws.close()

    run(go())


def test_connect_disconnect_cycles_keep_memory_flat(server, speech):
    import aiohttp
    import sphn

    async def cycle(i: int):
        async with aiohttp.ClientSession() as session:
            ws, hello = await _handshake(server.ws, session)
            assert hello == P.message(P.HANDSHAKE)
            writer = sphn.OpusStreamWriter(24000)
            for k in range(3):
                page = writer.append_pcm(speech[k * FRAME:(k + 1) * FRAME])
                # every other client leaves in the middle of a page
                await ws.send_bytes(P.message(P.AUDIO, page if k < 2 or i % 2 else page[: len(page) // 2]))
            await ws.close()

    for i in range(5):
        run(cycle(i))
    time.sleep(0.5)
    before = server.rss_mb()
    for i in range(20):
        run(cycle(i))
    time.sleep(0.5)
    after = server.rss_mb()
    assert after - before < 25, (before, after)
    deadline = time.time() + 10
    while server.health()["sessions"]["active"] and time.time() < deadline:
        time.sleep(0.1)
    assert server.health()["sessions"]["active"] == 0


@pytest.mark.slow
def test_long_session_keeps_memory_and_latency_flat(server, speech):
    """A long conversation (MOSHI_MLX_TEST_SESSION_MINUTES, default 1.5: the KV cache wraps
    4 times; 10 was run by hand, see BENCHMARKS.md) as fast as the server answers."""
    import threading

    minutes = float(os.environ.get("MOSHI_MLX_TEST_SESSION_MINUTES", "1.5"))
    frames = int(minutes * 60 * 12.5)
    pcm = np.tile(speech, -(-frames * FRAME // len(speech)))[: frames * FRAME]
    rss: list[float] = []
    done = threading.Event()

    def sample():
        while not done.wait(2.0):
            rss.append(server.rss_mb())

    dropped_before = server.health()["dropped_input_frames"]  # earlier tests may have sent bursts
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        conv = run(converse(server.ws, pcm, window=2), timeout=frames * 1.0 + 60)
    finally:
        done.set()
        sampler.join()
    assert not conv.errors and conv.frames == frames
    quarter = len(rss) // 4
    assert quarter >= 2, rss
    # memory: the last quarter no higher than the second (after warm-up) but for noise
    assert max(rss[-quarter:]) - max(rss[quarter:2 * quarter]) < 20, rss
    lat = np.array(conv.latencies_ms)
    early, late = np.median(lat[frames // 10: frames // 5]), np.median(lat[-frames // 10:])
    print(f"{minutes} min session: server RSS {rss[quarter]:.0f} → {rss[-1]:.0f} MB, median latency "
          f"{early:.0f} → {late:.0f} ms (2 frames in flight)")
    assert late < 1.5 * early + 20, (early, late)
    assert server.health()["dropped_input_frames"] == dropped_before


# -- the page, in Chromium --------------------------------------------------------------------------

def wait_until(page, expression: str, seconds: float) -> None:
    """Polls a page expression from here: Playwright's wait_for_function would evaluate it
    with eval() inside the page, which the page's Content-Security-Policy forbids."""
    deadline = time.time() + seconds
    while not page.evaluate(expression):
        assert time.time() < deadline, f"timed out after {seconds} s waiting for {expression}"
        time.sleep(0.2)


@pytest.mark.slow
def test_page_in_chromium(server, speech, tmp_path):
    """Debian's chromium, the fake microphone playing real speech: the page connects, its
    Opus pages reach the server, Moshi's audio reaches the worklet and plays, its words show."""
    from playwright.sync_api import sync_playwright

    assert Path("/usr/bin/chromium").exists(), "chromium missing: run scripts/test.sh (it installs it)"
    mic = tmp_path / "speech.wav"
    sf.write(mic, speech, 24000, subtype="PCM_16")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}", "--autoplay-policy=no-user-gesture-required",
            "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(server.url)
            page.click("#connect")
            wait_until(page, "window.moshi.handshake === true", 30)
            wait_until(page, "document.getElementById('transcript').textContent.trim().length > 0 && "
                             "window.moshi.stats && window.moshi.stats.played > 48000", 90)  # > 1 s played
            state = page.evaluate("window.moshi")
            page.screenshot(path=str(ARTIFACTS / "serve-page.png"))
            page.click("#connect")  # disconnect: the conversation can be downloaded
            wait_until(page, "!document.getElementById('download').classList.contains('disabled')", 10)
            assert page.get_attribute("#download", "href").startswith("blob:")
        finally:
            browser.close()
    assert not errors, errors
    assert state["pagesSent"] > 10 and state["pagesReceived"] >= 12  # 1 s of Moshi = 12.5 frames of one page
    assert state["stats"]["received"] >= state["stats"]["played"] > 48000  # samples reached the worklet, played
    assert state["server"]["frames"] > 0


# -- start-up and shutdown ----------------------------------------------------------------------------

def test_bad_arguments_are_one_line_errors(tmp_path, stt_model_dir):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "moshi_mlx", "serve", "--no-browser", *map(str, args)],
                              capture_output=True, text=True, timeout=120)

    for args, needle in (((("--ssl", tmp_path)), "cert.pem"),
                         (("--model", stt_model_dir), "transcribe"),
                         (("--port", "70000"), "65535"),
                         (("--max-sessions", "0"), ">= 1")):
        proc = serve(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_port_in_use_is_refused_before_loading(server, serve_model_dir):
    proc = subprocess.run([sys.executable, "-m", "moshi_mlx", "serve", "--no-browser", "--model", str(serve_model_dir),
                           "--port", str(server.port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "in use" in proc.stderr and "loading" not in proc.stderr, proc.stderr


def test_https_with_ssl(serve_model_dir, tmp_path):
    """--ssl DIR (cert.pem, key.pem): the page, health and the websocket over TLS."""
    import ssl

    import aiohttp

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")], check=True,
                   capture_output=True)
    s = Server("--model", serve_model_dir, "--ssl", tmp_path)
    try:
        assert s.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        with urllib.request.urlopen(s.url.replace("127.0.0.1", "localhost") + "api/health", context=context,
                                    timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"

        async def hello():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"wss://localhost:{s.port}/api/chat", ssl=context) as ws:
                    return (await ws.receive()).data

        assert run(hello()) == P.message(P.HANDSHAKE)
    finally:
        interrupt(s.proc, 30)


def test_ctrl_c_stops_the_server_with_a_client_connected(server):
    import aiohttp

    async def connect_then_interrupt():
        async with aiohttp.ClientSession() as session:
            ws, hello = await _handshake(server.ws, session)
            assert hello == P.message(P.HANDSHAKE)
            out, err = await asyncio.get_running_loop().run_in_executor(None, interrupt, server.proc, 30)
            msg = await ws.receive(timeout=10)
            return out, err, msg.type

    out, err, last = run(connect_then_interrupt())
    assert server.proc.returncode == 0, err
    assert "server stopped" in err and "Traceback" not in err
    assert last in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
