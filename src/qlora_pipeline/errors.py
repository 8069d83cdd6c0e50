"""The one exception type a user sees: a message that names the file, line or key, and the fix."""


class PipelineError(Exception):
    """Bad input or a bad param. Stages print the message and exit non-zero, without a traceback."""
