"""User-facing errors.

Every problem a user can fix (bad input, bad config, missing dataset) is raised as a
:class:`BSSError` whose message names the file or key and says what to do. Drivers catch it
and print one line instead of a traceback.
"""


class BSSError(Exception):
    """A problem with the user's input that they can fix; the message says how."""


class ConfigError(BSSError):
    """A config file or search space is invalid (unknown key, wrong type, bad value)."""


class DatasetError(BSSError):
    """A dataset folder is missing, empty, or holds a file that cannot be used."""
