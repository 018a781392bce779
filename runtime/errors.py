"""The one error class users see: a one-line message that says what was wrong and what to do."""


class LdmExportError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits with ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
