"""The one exception type a user can cause; the CLI prints it as a single line."""


class PipelineError(Exception):
    """An error caused by input, configuration or environment, reported without a traceback."""
