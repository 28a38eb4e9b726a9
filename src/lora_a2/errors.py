"""Errors that are the user's to fix: printed as one line, exit code 2, never a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data file, CLI flag) described in one line."""

    exit_code = 2
