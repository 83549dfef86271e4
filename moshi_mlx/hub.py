"""Finding model files: a local file, a local directory, or a Hugging Face repo id.

Every entry point resolves weights, configs and tokenizers through `resolve_file`, so
downloads get huggingface_hub's cache, progress bars and offline mode (HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError


def is_local(path_or_repo_id: str | Path) -> bool:
    p = Path(path_or_repo_id).expanduser()
    return p.exists() or str(path_or_repo_id).startswith((".", "/", "~")) or os.sep + os.sep in str(path_or_repo_id)


def list_files(source: str | Path, revision: str | None = None) -> list[str]:
    """File names at the top of a local directory or a repo."""
    if is_local(source):
        p = Path(source).expanduser()
        if not p.is_dir():
            raise CheckpointError(f"{p} is not a directory")
        return sorted(f.name for f in p.iterdir() if f.is_file())
    from huggingface_hub import list_repo_files

    try:
        return sorted(list_repo_files(str(source), revision=revision))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: say which and what to do
        raise CheckpointError(_hub_help(str(source), e)) from None


def resolve_file(source: str | Path, filename: str, revision: str | None = None) -> Path:
    """Path of `filename` inside a local directory or a repo (downloaded if needed)."""
    if is_local(source):
        p = Path(source).expanduser() / filename
        if not p.is_file():
            raise CheckpointError(f"{p} not found")
        return p
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(source), filename, revision=revision))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(_hub_help(f"{source}/{filename}", e)) from None


def _hub_help(what: str, e: Exception) -> str:
    return (f"could not get {what} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Check the repo id and your network, or download it elsewhere and pass the local "
            "directory instead (`huggingface-cli download REPO --local-dir DIR`). "
            "Offline, already-downloaded repos load with HF_HUB_OFFLINE=1.")
