# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The paths users give: telling a local path from a Hub id, and writing a result directory so that the user's
existing one is never half-written or lost."""

import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AttnResError


STAGING_MARKER = ".attnres-staging"  # in a staging directory until it is renamed into place: who made it


def is_missing_local_path(name: str) -> bool:
    """Whether `name` is a local path that does not exist, as opposed to an existing path or a possible Hub id.

    Hub ids are `name` or `org/name` (the Hub still redirects legacy one-part ids such as `gpt2`); anything
    absolute, starting with `.` or `~`, or with more than one `/` can only be a path, and saying so beats the Hub's
    "repo id must be in the form..." message.
    """
    path = Path(name).expanduser()
    return not path.exists() and (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1)


@contextmanager
def staged_directory(
    destination: str | os.PathLike, *, force: bool = False, flag: str = "--output", force_flag: str | None = "--force"
) -> Iterator[Path]:
    """Write the directory `destination` all at once.

    Yields an empty directory next to `destination` (on the same filesystem) to write into; when the block completes,
    it takes `destination`'s place, and an existing `destination` (only with `force`) is removed once the new one is in
    place. If the block fails, or the process is interrupted or terminated (the command line turns SIGTERM into an
    exit), the staging directory and any parent directory this created are removed and `destination` is untouched. A
    process killed outright leaves its staging directory behind with a marker naming it; the next run for the same
    destination removes such directories once their process is gone.

    A `destination` that is a symbolic link is followed: the link is kept and the directory it points to is replaced.
    The working directory and its ancestors are refused, as are existing files and, without `force`, non-empty
    directories; `flag` names the option in the messages, and `force_flag` the one that allows replacing (`None`
    for a command without one, whose messages then suggest only another path).
    """
    destination = Path(destination).expanduser().absolute()
    if destination.is_symlink():
        destination = destination.resolve()
    check_replaceable(destination, force=force, flag=flag, force_flag=force_flag)
    created = first_missing_ancestor(destination.parent)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(destination)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.attnres-staging-", dir=destination.parent))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # what mkdir and save_pretrained give, not mkdtemp's 0700
        (staging / STAGING_MARKER).write_text(json.dumps(process_identity()))
        yield staging
        (staging / STAGING_MARKER).unlink()
        replace_directory(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def check_replaceable(destination: Path, *, force: bool, flag: str, force_flag: str | None = "--force") -> None:
    cwd = Path.cwd().resolve()
    if cwd == destination.resolve() or cwd.is_relative_to(destination.resolve()):
        raise AttnResError(f"{flag} {destination} is the working directory or one of its parents; choose another path")
    if destination.exists() and not destination.is_dir():
        raise AttnResError(f"{flag} {destination} exists and is not a directory; choose another path")
    if destination.is_dir() and any(destination.iterdir()) and not force:
        fix = "choose another path" + (f" or pass {force_flag}" if force_flag else "")
        raise AttnResError(f"{flag} {destination} exists and is not empty; {fix}")


def replace_directory(new: Path, destination: Path) -> None:
    """Move `new` to `destination`; an existing destination is only removed once the new one is in place."""
    backup = None
    if destination.exists():
        backup = destination.with_name(f".{destination.name}.attnres-replaced-{uuid.uuid4().hex[:8]}")
        destination.rename(backup)
    try:
        new.rename(destination)
    except BaseException:
        if backup is not None:
            backup.rename(destination)
        raise
    if backup is not None:
        shutil.rmtree(backup)


def first_missing_ancestor(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (to remove it again if writing fails)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def process_identity(pid: int | None = None) -> dict:
    """This machine and a process on it, told apart from a later process that reuses its pid by its start time."""
    pid = os.getpid() if pid is None else pid
    try:
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        started = None
    return {"host": socket.gethostname(), "pid": pid, "started": started}


def remove_stale_staging(destination: Path) -> None:
    """Remove staging directories for `destination` left by processes of this machine that no longer run: only
    directories named as `staged_directory` names them and holding its marker."""
    for candidate in destination.parent.glob(f".{destination.name}.attnres-staging-*"):
        try:
            owner = json.loads((candidate / STAGING_MARKER).read_text())
        except (OSError, ValueError):
            continue
        if owner.get("host") == socket.gethostname() and process_identity(owner.get("pid")) != owner:
            shutil.rmtree(candidate, ignore_errors=True)
