"""`python -m tools.benchmark`: the benchmark's command line (see tools/benchmark/cli.py)."""

import sys

from eagle3_cache.errors import CacheConfigError

from .cli import main

try:
    main()
except CacheConfigError as error:
    sys.exit(f"error: {error}")
