"""moshi_mlx: Kyutai's Mimi codec and Moshi speech-text model on Apple MLX."""
# Must run before anything imports mlx.core (see cpu/blas.py for why).
from .cpu.blas import preload_blas as _preload_blas

_preload_blas()

__all__ = ["MimiConfig", "MimiModel", "LmConfig", "LMModel", "LMGen", "DuplexSession", "Sampler",
           "MoshiForConditionalGeneration", "MoshiForCausalLM", "SpeechToText", "Transcript", "Word", "EndWord",
           "EndOfTurn", "TurnConfig", "TextToSpeech", "Speech", "TtsStream", "TextTokenizer", "load"]
__version__ = "0.1.0"

# Public classes are imported on first use, so `import moshi_mlx` (e.g. by a benchmark
# worker that runs a PyTorch reference) does not pull in MLX.
_LAZY = {
    "MimiConfig": "moshi_mlx.models.mimi",
    "MimiModel": "moshi_mlx.models.mimi",
    "LmConfig": "moshi_mlx.models.lm",
    "LMModel": "moshi_mlx.models.lm",
    "LMGen": "moshi_mlx.sessions.lmgen",
    "DuplexSession": "moshi_mlx.sessions.duplex",
    "SpeechToText": "moshi_mlx.sessions.stt",
    "Transcript": "moshi_mlx.sessions.stt",
    "Word": "moshi_mlx.sessions.words",
    "EndWord": "moshi_mlx.sessions.words",
    "EndOfTurn": "moshi_mlx.sessions.words",
    "TurnConfig": "moshi_mlx.sessions.words",
    "TextToSpeech": "moshi_mlx.sessions.tts",
    "Speech": "moshi_mlx.sessions.tts",
    "TtsStream": "moshi_mlx.sessions.tts",
    "Sampler": "moshi_mlx.modules.sampling",
    "load": "moshi_mlx.models.loading",
    "MoshiForConditionalGeneration": "moshi_mlx.models.moshi",
    "MoshiForCausalLM": "moshi_mlx.models.moshi",
    "TextTokenizer": "moshi_mlx.tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moshi_mlx' has no attribute {name!r}")
