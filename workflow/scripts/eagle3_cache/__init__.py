"""eagle3-cache: build NeMo Automodel-compatible EAGLE-3 offline training caches."""

__version__ = "0.1.0"

# Bump when the bytes a shard holds change meaning for the same settings (a fix to the
# shift, the masks, the distribution...). It is a param of the shard rule, so a bump
# reruns every shard, while editing code that keeps the meaning does not.
CACHE_SEMANTICS_VERSION = 1
