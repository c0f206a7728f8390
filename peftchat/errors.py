"""Exceptions a user can cause. The CLI turns each into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a recipe, a data file, a path or a flag. Never a bug."""


class ConfigError(UserError):
    """A recipe that cannot be loaded or validated."""


class DataError(UserError):
    """A data file or record that cannot be turned into training samples."""
