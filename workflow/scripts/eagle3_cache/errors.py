"""The one exception type for input a user must fix."""


class CacheConfigError(ValueError):
    """A setting, file or sample the user must change; the message says which and how."""
