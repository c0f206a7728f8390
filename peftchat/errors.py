"""Exceptions a user can cause. The CLI turns each into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a recipe, a data file, a path or a flag. Never a bug."""


class ConfigError(UserError):
    """A recipe that cannot be loaded or validated."""


class DataError(UserError):
    """A data file or record that cannot be turned into training samples."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (SIGINT, SIGTERM, SIGHUP): the CLI exits 128 + `signum`.
    `checkpoint`: the complete checkpoint that holds the run's state, when one was written.
    A KeyboardInterrupt, so that whatever cleans up after Ctrl-C cleans up after these too."""

    def __init__(self, signum: int, detail: str, checkpoint: object = None) -> None:
        super().__init__(detail)
        self.signum = signum
        self.detail = detail
        self.checkpoint = checkpoint
