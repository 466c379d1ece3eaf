"""The one exception type a user can cause."""


class FlawscopeError(Exception):
    """A problem with the user's input (path, image, config, model directory).

    The message names the file or key and the problem on one line; the CLI prints it as
    ``error: <message>`` and exits with status 2, without a traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): the part of a
    library's multi-line error that fits into a one-line ``FlawscopeError``. OpenVINO's errors
    open with ``Exception from <source file>`` lines that say where, not what: those are skipped."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if not line.startswith("Exception from")]
    return (telling or lines or [type(exc).__name__])[0]
