"""moshi_mlx: Kyutai's Mimi codec and Moshi speech-text model on Apple MLX."""
# Must run before anything imports mlx.core (see _blas.py for why).
from ._blas import preload_blas as _preload_blas

_preload_blas()

from .models.mimi import MimiConfig, MimiModel  # noqa: E402

__all__ = ["MimiConfig", "MimiModel"]
__version__ = "0.1.0"
