"""Worker process entry: `python -m moshi_mlx.apps.bench.worker JSON` runs one job (see
common.run_job) and prints its result as one JSON line."""
from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    job = getattr(importlib.import_module(spec["module"]), spec["job"])(**spec["args"])
    if getattr(job, "uses_moshi_mlx", True):
        import moshi_mlx  # noqa: F401 - the optimized BLAS must load before mlx.core
    try:
        result = job.run()
    except ImportError as e:
        result = {"error": f"not installed: {e.name}"}
    except Exception as e:  # noqa: BLE001 - a benchmark row reports what went wrong
        result = {"error": f"{type(e).__name__}: {e}"[:160]}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
