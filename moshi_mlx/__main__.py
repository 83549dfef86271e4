import sys

from moshi_mlx.cli import main

sys.exit(main())
