"""The one exception type a user can cause."""


class FlawscopeError(Exception):
    """A problem with the user's input (path, image, config, model directory).

    The message names the file or key and the problem on one line; the CLI prints it as
    ``error: <message>`` and exits with status 2, without a traceback.
    """
