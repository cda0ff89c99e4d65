# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The one exception type that the `attnres` command reports as a one-line message."""


class AttnResError(Exception):
    """A problem with what the user gave (a path, an option, a checkpoint, a data file), explained by the message
    together with the fix. The command line prints it as one line and exits with 1; any other exception is a bug and
    keeps its traceback."""
