# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""Writing a result directory without ever leaving the user's existing one half-written or lost."""

import shutil
import uuid
from pathlib import Path


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
