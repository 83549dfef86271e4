"""Finding model files: a local file, a local directory, or a Hugging Face repo id.

Every entry point resolves weights, configs and tokenizers through `resolve_file`, so
downloads get huggingface_hub's cache, progress bars and offline mode (HF_HUB_OFFLINE=1).

Failing fast: huggingface_hub retries a failed download 5 times with backoff (~23 s and a
dozen log lines when there is no network) before it falls back to its cache. So before the
first request we check once, in at most PROBE_TIMEOUT seconds, that the hub answers; when
HF_HUB_OFFLINE is set or it does not answer, only the local cache is used, and a repo that
is not there fails at once with one line saying why and what to run.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
from pathlib import Path

from ..errors import CheckpointError

PROBE_TIMEOUT = 3.0

# `name` or `org/name` (huggingface_hub's rules, loosely); anything else is a path.
_REPO_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")
# A repo id never ends like a file: `models/x.safetensors` is a missing local file, not a repo.
_FILE_SUFFIXES = {".safetensors", ".json", ".model", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".npy", ".gguf",
                  ".wav", ".flac", ".ogg", ".mp3", ".txt", ".yaml", ".yml", ".tar", ".gz", ".zip"}


def is_local(path_or_repo_id: str | Path) -> bool:
    """True for an existing path, or anything that cannot be a repo id (so a missing file is
    reported as missing, not as an unknown repo)."""
    s = str(path_or_repo_id)
    if Path(s).expanduser().exists() or s.startswith((".", "/", "~")):
        return True
    return not _REPO_ID.fullmatch(s) or Path(s).suffix.lower() in _FILE_SUFFIXES


def list_files(source: str | Path, revision: str | None = None) -> list[str]:
    """File names at the top of a local directory, or in a repo."""
    if is_local(source):
        p = Path(source).expanduser()
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or directory")
        if not p.is_dir():
            raise CheckpointError(f"{p} is not a directory")
        return sorted(f.name for f in p.iterdir() if f.is_file())
    repo = str(source)
    offline = _cache_only()
    with _hub_errors(repo, None, revision, offline):
        if offline:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
            return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
        from huggingface_hub import list_repo_files

        return sorted(list_repo_files(repo, revision=revision))


def resolve_file(source: str | Path, filename: str, revision: str | None = None) -> Path:
    """Path of `filename` inside a local directory or a repo (downloaded if needed)."""
    if is_local(source):
        p = Path(source).expanduser() / filename
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file")
        return p
    from huggingface_hub import hf_hub_download

    offline = _cache_only()
    with _hub_errors(str(source), filename, revision, offline):
        return Path(hf_hub_download(str(source), filename, revision=revision, local_files_only=bool(offline)))


def _cache_only() -> str | None:
    """Why only the local cache can be used (offline mode, or no answer from the hub), or None."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    return _hub_unreachable()


@functools.lru_cache(maxsize=1)
def _hub_unreachable() -> str | None:
    """One quick request to the hub's endpoint (honours HF_ENDPOINT and proxy variables), in a
    thread so that a hanging DNS lookup cannot hold us longer than PROBE_TIMEOUT either."""
    import ssl
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    url = constants.ENDPOINT
    failure: list[str] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT).close()
        except urllib.error.HTTPError:
            pass  # the server answered
        except Exception as e:  # noqa: BLE001 - DNS, refused, timeout, …
            reason = getattr(e, "reason", e)
            if not isinstance(reason, ssl.SSLError):  # a TLS problem is huggingface_hub's to report
                failure.append(str(reason))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT + 0.5)
    if thread.is_alive():
        return f"{url} did not answer within {PROBE_TIMEOUT:.0f} s"
    return f"cannot reach {url} ({failure[0]})" if failure else None


@contextlib.contextmanager
def _hub_errors(repo: str, filename: str | None, revision: str | None, offline: str | None):
    """huggingface_hub's exceptions (several lines, request ids) → one CheckpointError line;
    its retry warnings are silenced: the error says it all."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: say which and what to do
        raise CheckpointError(_hub_message(repo, filename, revision, offline, e)) from None
    finally:
        hub_logger.setLevel(level)


def _hub_message(repo: str, filename: str | None, revision: str | None, offline: str | None, e: Exception) -> str:
    kinds = {c.__name__ for c in type(e).__mro__}
    what = f"{repo}/{filename}" if filename else repo
    download = f"`hf download {repo} --local-dir DIR`, then pass DIR instead of the repo id"
    if offline and ("LocalEntryNotFoundError" in kinds or "OfflineModeIsEnabled" in kinds):
        fix = ("unset it, or download the repo first" if offline.startswith("HF_HUB_OFFLINE")
               else "check your network, or download the repo elsewhere")
        return (f"{what} is not in the local Hugging Face cache and {offline}, so only the cache is used; "
                f"{fix} ({download})")
    if "RepositoryNotFoundError" in kinds:
        return (f"{repo}: no such repo on the Hugging Face hub (check the id; private or gated repos need "
                "`hf auth login`)")
    if "RevisionNotFoundError" in kinds:
        return f"{repo}: no revision {revision!r} on the Hugging Face hub"
    if "EntryNotFoundError" in kinds and "LocalEntryNotFoundError" not in kinds:
        return f"{repo} has no file {filename!r}"
    detail = " ".join(str(e).split())
    detail = detail[:200] + "…" if len(detail) > 200 else detail
    return (f"could not get {what} from the Hugging Face hub ({type(e).__name__}: {detail}); check the repo id "
            f"and your network, or download it elsewhere ({download}); offline, downloaded repos load with "
            "HF_HUB_OFFLINE=1")
