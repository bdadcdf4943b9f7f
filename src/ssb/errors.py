"""The one exception type users see: a problem with their input, reported as one clear line and exit code 2."""


class SsbError(Exception):
    """A user-facing error (bad config, missing file, bad data, nothing to train on). The CLI prints
    ``ssb: error: <message>`` and exits with status 2; no traceback."""
