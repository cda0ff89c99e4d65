# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The paths users give: telling a local path from a Hub id, and writing a result directory so that the user's
existing one is never half-written or lost."""

import ctypes
import errno
import functools
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import AttnResError


STAGING_MARKER = ".attnres-staging"  # in a staging or download directory while it is in use: who made it
# Staging and backup directories are named after their destination, cut to this many characters so that a name near
# the filesystem's limit (255 bytes) still leaves room for the suffix (48 characters of at most 4 bytes, + 27 < 255).
NAME_IN_TEMPORARY = 48
AT_FDCWD, RENAME_NOREPLACE = -100, 1  # <fcntl.h>, <linux/fs.h>
# The second half of a one-line message about an OS error on a path the user gave: what to do about it.
OS_ERROR_FIXES = {
    errno.ENOSPC: "free some space or choose another path",
    errno.EDQUOT: "free some space or choose another path",
    errno.EFBIG: "free some space or choose another path",
    errno.EROFS: "the filesystem is read-only; choose another path",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.ELOOP: "a symbolic link on the way loops back on itself; fix it or choose another path",
    errno.ENOTDIR: "a file stands where a directory is needed; choose another path",
    errno.EEXIST: "a file stands where a directory is needed; choose another path",
}
# Errors of writing that name no file (a full disk fails `write`, which has no path).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def is_missing_local_path(name: str) -> bool:
    """Whether `name` is a local path that does not exist, as opposed to an existing path or a possible Hub id.

    Hub ids are `name` or `org/name` (the Hub still redirects legacy one-part ids such as `gpt2`); anything
    absolute, starting with `.` or `~`, or with more than one `/` can only be a path, and saying so beats the Hub's
    "repo id must be in the form..." message.
    """
    path = Path(name).expanduser()
    return not path.exists() and (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1)


def os_error_message(error: OSError) -> str:
    """`error` as the end of a one-line message: the system's reason, the file, and what to do. For the errors of the
    filesystem a path lives on (full, read-only, not writable, a name too long), which are the user's to fix and no
    bug of this program."""
    where = f" ({os.fsdecode(error.filename)})" if isinstance(error.filename, str | bytes) else ""
    fix = OS_ERROR_FIXES.get(error.errno)
    return f"{error.strerror or error}{where}" + (f"; {fix}" if fix else "")


def printable(text: str | os.PathLike) -> str:
    """`text` (or a path) as it can be written into a UTF-8 file or printed: the bytes of a file name that are not
    UTF-8, which Python keeps as lone surrogates, become U+FFFD."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def is_utf8(path: str | os.PathLike) -> bool:
    """Whether `path` is valid UTF-8 (safetensors opens no other paths)."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_link_inside(path: Path, roots: list[Path], what: str) -> None:
    """Refuse a file `path` that is a symbolic link to a file outside all of `roots`: copying it would put someone
    else's file (an SSH key, another project's data) into an output that is made to be shared. `what` names the file
    in the message."""
    target = path.resolve()
    if not any(target.is_relative_to(root.resolve()) for root in roots):
        raise AttnResError(
            f"{what} is a symbolic link to {target}, outside {roots[0]}; files from elsewhere are not copied into the "
            "output (it is made to be shared): copy the file in, or remove the link"
        )


@contextmanager
def staged_directory(
    destination: str | os.PathLike, *, force: bool = False, flag: str = "--output", force_flag: str | None = "--force"
) -> Iterator[Path]:
    """Write the directory `destination` all at once.

    Yields an empty directory next to `destination` (on the same filesystem) to write into; when the block completes,
    it takes `destination`'s place, and an existing `destination` (only with `force`) is removed once the new one is in
    place. Without `force`, a `destination` that was created or filled while the block ran is left as it is and the
    result is refused (`rename_no_replace`). Every file of the result gets the mode an ordinary new file gets (0644
    under the usual umask), whatever wrote it (safetensors 0.8 writes 0600).

    If the block fails, or the process is interrupted or terminated (the command line turns SIGTERM into an exit),
    the staging directory and any parent directory this created are removed and `destination` is untouched. A
    process killed outright leaves its staging directory behind with a marker naming it; the next run for the same
    destination removes such directories once their process is gone. A filesystem that is full, read-only or not
    writable is an `AttnResError` that says so.

    A `destination` that is a symbolic link is followed: the link is kept and the directory it points to is replaced.
    The working directory and its ancestors are refused, as are existing files and, without `force`, non-empty
    directories; `flag` names the option in the messages, and `force_flag` the one that allows replacing (`None`
    for a command without one, whose messages then suggest only another path).
    """
    destination = Path(destination).expanduser().absolute()
    check_replaceable(destination, force=force, flag=flag, force_flag=force_flag)
    if destination.is_symlink():
        destination = destination.resolve()
        check_replaceable(destination, force=force, flag=flag, force_flag=force_flag)
    created = first_missing_ancestor(destination.parent)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_directories(destination.parent, staging_prefix(destination))
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(destination), dir=destination.parent))
    except OSError as error:
        remove_created(created)
        raise AttnResError(f"cannot write {flag} {destination}: {os_error_message(error)}") from None
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # what mkdir and save_pretrained give, not mkdtemp's 0700
        mark_owner(staging)
        yield staging
        (staging / STAGING_MARKER).unlink()
        set_default_file_modes(staging)
        replace_directory(staging, destination, force=force, flag=flag, force_flag=force_flag)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        remove_created(created)
        if isinstance(error, OSError) and is_write_error(error, staging, destination):
            raise AttnResError(f"cannot write {flag} {destination}: {os_error_message(error)}") from None
        raise


def staging_prefix(destination: Path) -> str:
    return f".{destination.name[:NAME_IN_TEMPORARY]}.attnres-staging-"


def is_write_error(error: OSError, staging: Path, destination: Path) -> bool:
    """Whether `error` comes from writing the output (a path in `staging`, `destination`, or a full or read-only
    filesystem under a `write` that names no path), rather than from reading the inputs."""
    if not isinstance(error.filename, str | bytes):
        return error.errno in WRITE_ERRNOS
    filename = Path(os.fsdecode(error.filename)).absolute()
    return filename == destination or filename.is_relative_to(staging)


def check_replaceable(destination: Path, *, force: bool, flag: str, force_flag: str | None = "--force") -> None:
    """Refuse, before any work is done, a destination that must not or cannot be written: the working directory or
    one of its parents, an existing file, a non-empty directory without `force`, a name longer than the filesystem
    allows, a parent that is a file, a symbolic link that loops. `force_flag` names the option that allows replacing
    (`None` for a command without one, whose messages then suggest only another path)."""
    limit = name_max(destination)
    for part in destination.parts:
        if len(os.fsencode(part)) > limit:
            raise AttnResError(
                f"{flag} {destination}: the name {part[:24]}... is {len(os.fsencode(part))} bytes long, more than "
                f"the {limit} its filesystem allows; choose a shorter name"
            )
    try:
        nearest = next(parent for parent in destination.parents if parent.exists())
        if not nearest.is_dir():
            raise AttnResError(f"{flag} {destination}: {nearest} is a file, not a directory; choose another path")
        with suppress(FileNotFoundError):  # nothing there, or a link to nothing (its target is created)
            destination.stat()  # raises for a symbolic link that loops
        cwd = Path.cwd().resolve()
        if cwd == destination.resolve() or cwd.is_relative_to(destination.resolve()):
            raise AttnResError(
                f"{flag} {destination} is the working directory or one of its parents; choose another path"
            )
        if destination.exists() and not destination.is_dir():
            raise AttnResError(f"{flag} {destination} exists and is not a directory; choose another path")
        if destination.is_dir() and any(destination.iterdir()) and not force:
            fix = "choose another path" + (f" or pass {force_flag}" if force_flag else "")
            raise AttnResError(f"{flag} {destination} exists and is not empty; {fix}")
    except OSError as error:  # a symbolic link that loops, a directory that cannot be read, ...
        raise AttnResError(f"{flag} {destination}: {os_error_message(error)}") from None


def name_max(path: Path) -> int:
    """The longest file name (in bytes) the filesystem of `path`'s nearest existing ancestor allows: 255 on most."""
    for ancestor in path.parents:
        try:
            return os.pathconf(ancestor, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def replace_directory(new: Path, destination: Path, *, force: bool, flag: str, force_flag: str | None) -> None:
    """Move `new` to `destination`. With `force`, an existing destination is only removed once the new one is in
    place. Without, only an empty directory is replaced (the one `check_replaceable` let through), and only while it
    is still empty: one that was filled, or any file that appeared meanwhile, is left as it is and the move refused."""
    if force and destination.exists():
        backup = destination.with_name(
            f".{destination.name[:NAME_IN_TEMPORARY]}.attnres-replaced-{uuid.uuid4().hex[:8]}"
        )
        destination.rename(backup)
        try:
            new.rename(destination)
        except BaseException:
            backup.rename(destination)
            raise
        shutil.rmtree(backup)
        return
    try:
        if destination.is_dir() and not destination.is_symlink():
            destination.rmdir()  # fails unless still empty
        rename_no_replace(new, destination)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise AttnResError(
            f"{flag} {destination} appeared or was filled while this command ran; it was left as it is and nothing "
            "was written: choose another path" + (f", or pass {force_flag} to replace it" if force_flag else "")
        ) from None


def rename_no_replace(source: Path, destination: Path) -> None:
    """Rename the directory `source` to `destination`, or fail with FileExistsError if anything is there, in one
    atomic step: Linux's renameat2(RENAME_NOREPLACE), so a destination created a moment before is never replaced.

    Where that call is missing (other systems, or a filesystem without the flag), plain rename(2) is used, which
    POSIX never lets replace a non-empty directory or a file by a directory (ENOTEMPTY, EEXIST, ENOTDIR): there, only
    an empty directory created in between would be replaced, and nothing in it is lost."""
    renameat2 = libc_renameat2()
    if renameat2 is not None:
        if renameat2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(destination), RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(destination))
    try:
        os.rename(source, destination)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(destination)) from None
        raise


@functools.cache
def libc_renameat2() -> Callable[..., int] | None:
    """The C library's renameat2 (glibc 2.28+, musl 1.1.24+), or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # no C library by that name, no such function, Windows
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def set_default_file_modes(directory: Path) -> None:
    """Give every file under `directory` the mode `open` gives a new file (0644 under umask 022), whatever wrote it."""
    mode = 0o666 & ~current_umask()
    for parent, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def first_missing_ancestor(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (to remove it again if writing fails)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def remove_created(directory: Path | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


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


def mark_owner(directory: Path) -> None:
    """Mark `directory` as this process's, so that a later run can tell it is left over once the process is gone."""
    (directory / STAGING_MARKER).write_text(json.dumps(process_identity()))


def remove_stale_directories(parent: Path, prefix: str) -> None:
    """Remove the directories `parent/prefix*` left by processes of this machine that no longer run (killed
    outright, before they could clean up): only those holding the marker `mark_owner` writes."""
    for candidate in parent.glob(f"{prefix}*"):
        try:
            owner = json.loads((candidate / STAGING_MARKER).read_text())
        except (OSError, ValueError):
            continue
        if owner.get("host") == socket.gethostname() and process_identity(owner.get("pid")) != owner:
            shutil.rmtree(candidate, ignore_errors=True)
