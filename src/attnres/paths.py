# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The paths users give: telling a local path from a Hub id, and writing a result directory without ever leaving the
user's existing one half-written or lost."""

import shutil
import uuid
from pathlib import Path


def is_missing_local_path(name: str) -> bool:
    """Whether `name` is a local path that does not exist, as opposed to an existing path or a possible Hub id.

    Hub ids are `name` or `org/name` (the Hub still redirects legacy one-part ids such as `gpt2`); anything
    absolute, starting with `.` or `~`, or with more than one `/` can only be a path, and saying so beats the Hub's
    "repo id must be in the form..." message.
    """
    path = Path(name).expanduser()
    return not path.exists() and (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1)


def replace_directory(new: Path, destination: Path) -> None:
    """Move `new` to `destination`; an existing destination is only removed once the new one is in place."""
    backup = None
    if destination.exists():
        backup = destination.with_name(f".{destination.name}.replaced-{uuid.uuid4().hex[:8]}")
        destination.rename(backup)
    try:
        new.rename(destination)
    except BaseException:
        if backup is not None:
            backup.rename(destination)
        raise
    if backup is not None:
        shutil.rmtree(backup)
