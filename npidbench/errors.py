"""The two kinds of failure the CLI distinguishes (ARCHITECTURE.md, "CLI contract").

Library code raises these with a message that names the file or value at fault and what would
fix it; the CLI prints the message as one line and exits with ``exit_code``.
"""


class NpidbenchError(Exception):
    """Base class: a failure with a message meant for the user."""

    exit_code = 1


class BadInput(NpidbenchError):
    """The user's input is wrong (a file, a value, a layout): exit code 2."""

    exit_code = 2


class RunFailed(NpidbenchError):
    """The input was fine but the run could not complete: exit code 1."""

    exit_code = 1
