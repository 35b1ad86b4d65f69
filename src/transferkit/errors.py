"""The one error class meant for users: what was wrong, where, and what to do."""


class TransferKitError(Exception):
    """An error the user can fix. The CLI prints its message on one line, without a traceback."""
