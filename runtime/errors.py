"""The one error class users see: a one-line message that says what was wrong and what to do."""


def overflow_fix(component: str) -> str:
    """What to do when ``component`` of an fp16 bundle produced NaN/Inf: the build flag that keeps it in fp32."""
    return "rebuild with --no-half-vae (the decoder in fp32)" if component == "vae_decoder" else "rebuild with --precision fp32"


class LdmExportError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits with ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
