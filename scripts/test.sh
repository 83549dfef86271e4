#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs the test suite:
#   system packages, a virtualenv in .venv, MLX, the project, and the PyTorch references
#   (torch 2.13.0 CPU, Kyutai's moshi 0.2.13 with --no-deps, transformers 4.57).
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages (Debian/Ubuntu): OpenBLAS makes MLX's CPU backend 10-30x faster; espeak-ng
# speaks test sentences; PortAudio is what sounddevice opens devices with; PulseAudio (a null sink)
# and the ALSA pulse plugin give the chat test real audio devices; Chromium runs the web page of
# `moshi-mlx serve` (driven by Playwright, which never downloads a browser of its own here).
if command -v apt-get >/dev/null 2>&1; then
    need=()
    for pkg in libopenblas0 libportaudio2 espeak-ng pulseaudio pulseaudio-utils libasound2-plugins chromium; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
        echo "installing system packages: ${need[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --upgrade pip

# torch first, pinned, so that nothing later pulls another build (here: the local CPU wheel).
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
# Kyutai's reference pins torch<2.10 and older numpy/safetensors; it runs fine with ours.
python -c "import moshi" 2>/dev/null || pip install -q --no-deps "moshi==0.2.13"

# Kyutai's own MLX package, in its own virtualenv (its import name is moshi_mlx too): the tests
# load checkpoint files it writes.
if [ ! -x .venv-kyutai-mlx/bin/python ]; then
    "$PYTHON" -m venv .venv-kyutai-mlx
    .venv-kyutai-mlx/bin/pip install -q "mlx[cpu]" numpy safetensors sentencepiece huggingface_hub
    .venv-kyutai-mlx/bin/pip install -q --no-deps "moshi-mlx==0.3.0"
fi

python -m pytest "$@"
