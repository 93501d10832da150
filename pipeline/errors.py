"""The one exception type a user can cause; the CLI prints it as a single line."""


class PipelineError(Exception):
    """An error caused by input, configuration or environment, reported without a traceback."""


# Stop signals (SIGINT, SIGTERM) the CLI received. The handler raises KeyboardInterrupt, but Python drops an
# exception raised while it runs a weakref callback or a __del__ ("Exception ignored in ..."): seen in about 1 of 10
# Ctrl-Cs during extraction, which then ran to the end. Long loops check this list too, so a dropped interrupt still
# stops them at the next batch.
stop_signals: list[int] = []


def on_stop_signal(signum: int, frame: object) -> None:
    stop_signals.append(signum)
    raise KeyboardInterrupt


def raise_if_stopped() -> None:
    if stop_signals:
        raise KeyboardInterrupt
