"""The web page's files: the vendored Opus workers are exactly the npm release they claim to be,
every file the page loads exists, and the package ships them all."""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "apps" / "web"
VENDOR = WEB / "vendor" / "opus-recorder"


def manifest() -> dict:
    return json.loads((VENDOR / "VENDORED.json").read_text())


def test_vendored_files_match_their_manifest():
    m = manifest()
    on_disk = {p.name for p in VENDOR.iterdir()} - {"VENDORED.json"}
    assert on_disk == {Path(name).name for name in m["files"]}
    for name, digest in m["files"].items():
        assert hashlib.sha256((VENDOR / Path(name).name).read_bytes()).hexdigest() == digest, name


def test_vendored_files_are_the_npm_release(tmp_path):
    """Fetches the release from the npm registry (as `npm install` would) and compares."""
    m = manifest()
    assert shutil.which("npm"), "npm missing: install Node.js (scripts/test.sh runs on machines that have it)"
    proc = subprocess.run(["npm", "pack", f"{m['package']}@{m['version']}", "--pack-destination", str(tmp_path),
                           "--silent"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    tgz = tmp_path / proc.stdout.strip().splitlines()[-1]
    algorithm, expected = m["integrity"].split("-", 1)
    assert base64.b64encode(hashlib.new(algorithm, tgz.read_bytes()).digest()).decode() == expected
    with tarfile.open(tgz) as tar:
        for name, digest in m["files"].items():
            data = tar.extractfile(f"package/{name}").read()
            assert hashlib.sha256(data).hexdigest() == digest, name


def test_every_file_the_page_loads_exists():
    html = (WEB / "index.html").read_text()
    app = (WEB / "app.js").read_text()
    refs = re.findall(r'(?:src|href)="(assets/[^"]+)"', html)
    refs += ["assets/duplex-worklet.js"] if "assets/duplex-worklet.js" in app else []
    vendor = re.search(r'const OPUS = "(assets/[^"]+)"', app).group(1)
    refs += [vendor + name for name in re.findall(r'OPUS \+ "([^"]+)"', app)]
    assert len(refs) >= 5, refs
    for ref in refs:
        assert (WEB / ref.removeprefix("assets/")).is_file(), ref
    # the decoder worker fetches its WebAssembly beside itself
    assert (VENDOR / "decoderWorker.min.wasm").is_file()


def test_the_package_ships_every_web_file():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["moshi_mlx.apps"]
    files = [p.relative_to(WEB.parent).as_posix() for p in WEB.rglob("*") if p.is_file()]
    assert files
    for f in files:
        assert any(fnmatch.fnmatch(f, pattern) and f.count("/") == pattern.count("/") for pattern in patterns), f
