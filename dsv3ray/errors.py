"""User errors: mistakes a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in a config, a command line or an input file. Message = what, where, what to do."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value: names the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config {key}={value!r} is invalid: {allowed}")

    def __reduce__(self):  # picklable, so Ray can carry it from a worker to the driver
        return (type(self), (self.key, self.value, self.allowed))
