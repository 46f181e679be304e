"""The exception types for what a user must fix or rebuild."""


class CacheConfigError(ValueError):
    """A setting, file or sample the user must change; the message says which and how."""


class ShardScanError(RuntimeError):
    """A shard's rows fail the numeric scan; the message names the shard, the field and the first sample."""
