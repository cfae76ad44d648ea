"""One exception type for user-facing errors: the CLI prints its message on one line and exits 2."""


class CTTransferError(Exception):
    """An input or option problem the user can fix; the message names the file or option."""
