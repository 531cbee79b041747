"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class QtuneError(Exception):
    """A problem with the user's input or environment, stated so the user can fix it."""

    exit_code = 2


class NonFiniteLossError(QtuneError):
    """Training produced a NaN or infinite loss."""

    exit_code = 3
