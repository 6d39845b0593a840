"""The error of an export that cannot be written in the requested format."""


class ExportError(ValueError):
    """The model cannot be written in the requested format; the message says why."""
