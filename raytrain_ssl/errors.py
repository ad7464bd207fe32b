"""The error the command line prints as one line, in a module that imports nothing heavy (no torch), so
processes that only pass data along (Ray Train's controller and dataset manager) can raise and catch it."""


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming the key and what is allowed."""
