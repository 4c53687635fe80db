"""The exceptions fastfwd raises, one per condition.

The CLI catches :class:`FastfwdError`, prints its message as one line and
exits with :attr:`FastfwdError.exit_code`; anything else is a bug and keeps
its traceback.
"""

EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_SETUP = 3


class FastfwdError(Exception):
    """Base class of every error fastfwd reports to its user."""

    exit_code = EXIT_RUNTIME


class ConfigError(FastfwdError):
    """A configuration file or flag is invalid.

    ``problems`` holds ``(file, line, reason)`` tuples, one per bad line.
    """

    exit_code = EXIT_CONFIG

    def __init__(self, message, problems=()):
        super().__init__(message)
        self.problems = list(problems)


class PermissionProblem(FastfwdError):
    """The process lacks a privilege it needs (CAP_NET_ADMIN, root)."""

    exit_code = EXIT_SETUP


class DeviceError(FastfwdError):
    """A TUN device could not be opened or configured."""

    exit_code = EXIT_SETUP


class TransportError(FastfwdError):
    """A UDP socket could not be created, bound or connected."""

    exit_code = EXIT_SETUP


class PeerUnreachable(FastfwdError):
    """The other side of the tunnel cannot be resolved or reached."""


class ProtocolError(FastfwdError):
    """The peer sent something the wire protocol does not allow."""


class RouteConflict(FastfwdError):
    """A route would replace or overlap one that fastfwd did not make."""
