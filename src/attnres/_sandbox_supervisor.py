# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The supervisor `attnres.code_execution` starts for each candidate: `python -I -B _sandbox_supervisor.py CONFIG`.

It is a script of its own, not code attnres imports, because it runs in the candidate's interpreter, where only the
standard library may be loaded. With namespaces (Linux with util-linux `unshare`) it is PID 1 of the candidate's PID
namespace and holds the capabilities over its mount namespace, which the candidate never does:

1. It forks the candidate, which enters a user namespace of its own and waits. The supervisor maps one user and one
   group into it: `nobody` for a root evaluator, the evaluator's own user otherwise. RLIMIT_NPROC counts processes
   per user *and user namespace*, so the process limit the candidate then sets counts its own processes only, not
   those of the other candidates running beside it as the same user (Linux 5.14 or newer).
2. It makes every mount read-only (`mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY)`, or each mount in turn where the
   kernel predates that call), so the candidate can change no file outside its mount namespace: not a virtual
   environment's site-packages, nor a checkout or a world-writable directory.
3. It covers the evaluator's home and Hugging Face directories with empty read-only tmpfs, and /tmp, /var/tmp and
   /dev/shm with one private tmpfs of bounded size, then binds back the interpreter's directories if they lie in one.
4. It writes the program, which it read from a descriptor (no other candidate can reach it), into the working
   directory on the private /tmp, and lets the candidate go. Everything the candidate writes vanishes with its mount
   namespace: the evaluator has nothing to clean up, and no candidate sees another's files.

The candidate then takes its user and group (no capability left, `no_new_privs`), caps its resources (here rather
than in a `preexec_fn`, which is unsafe with `run_programs`' worker threads), runs the program as __main__ and, only if
the program returned, writes the nonce it read from a pipe (then closed) to the result pipe and exits at once, before
atexit hooks. `exit(0)`, `os._exit(0)`, an exception or an atexit hook that exits with 0 never reach that write, so
they fail, as in OpenAI's `check_correctness`. The nonce defends the score against programs that end early, not
against a program that deliberately searches its own interpreter's memory (or walks its frames) for it; the
namespaces and limits are the security boundary, not the sentinel.

The supervisor exits with the candidate's status, or 128 + N if signal N ended it (as a shell does): a namespace's
PID 1 ignores the signals it has no handler for, SIGXCPU from the CPU limit included, so the program must not run as
PID 1 itself. Without namespaces it only forks the candidate in the evaluator's temporary directory and applies the
limits.
"""

import ctypes
import errno
import json
import os
import re
import resource
import runpy
import sys


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_NOSYMFOLLOW = 1, 2, 4, 8, 32, 256
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 4096, 16384, 1 << 21, 1 << 24
CLONE_NEWUSER, PR_SET_NO_NEW_PRIVS, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 0x10000000, 38, 0x8000, 1
CAPABILITY_VERSION_3 = 0x20080522
# mount_setattr's number where it is known (Linux 5.12+); elsewhere each mount is remounted instead.
MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}.get(os.uname().machine)
# The per-mount flags that a bind remount must repeat: in a user namespace, those the parent namespace set are locked.
KEPT_MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "nosymfollow": MS_NOSYMFOLLOW,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}
WORKDIR = "/tmp/candidate"  # the candidate's working directory and home when its /tmp is private
SCRATCH = ("/var/tmp", "/dev/shm")  # made private along with /tmp, where they exist

libc = ctypes.CDLL(None, use_errno=True)


class CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapabilitySet(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def check(status: int, action: str) -> None:
    if status != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{action}: {os.strerror(error)}")


def mount(
    source: str | None, target: str, filesystem: str | None, flags: int, options: str | None, action: str
) -> None:
    arguments = [None if text is None else text.encode() for text in (source, target, filesystem)]
    check(libc.mount(*arguments, flags, None if options is None else options.encode()), action)


def make_read_only() -> None:
    """Every mount of this mount namespace read-only, atomically where the kernel has mount_setattr."""
    if MOUNT_SETATTR is not None:
        attributes = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)  # struct mount_attr: set, clear, propagation
        if libc.syscall(MOUNT_SETATTR, -100, b"/", AT_RECURSIVE, attributes, ctypes.sizeof(attributes)) == 0:
            return
        if ctypes.get_errno() != errno.ENOSYS:  # anything but a kernel before 5.12 is an error
            check(-1, "making the filesystem read-only")
    remount_each_read_only()


def remount_each_read_only() -> None:
    """Remount every reachable mount read-only, repeating its other per-mount flags (locked in a user namespace).

    A mount whose mount point resolves to another mount (one mounted over it, such as the host's /proc under the
    candidate's) is out of reach and skipped.
    """
    with open("/proc/self/mountinfo") as table:
        mounts = [line.split() for line in table]
    for fields in mounts:
        mount_id, mount_point, options = int(fields[0]), _unescape(fields[4]), fields[5].split(",")
        try:
            descriptor = os.open(mount_point, os.O_PATH)
        except OSError:
            continue
        try:
            if _mount_id(descriptor) != mount_id:
                continue
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | sum(KEPT_MOUNT_FLAGS.get(option, 0) for option in options)
            if "noatime" not in options and "relatime" not in options:
                flags |= MS_STRICTATIME  # a bind remount would otherwise default to relatime
            mount(None, f"/proc/self/fd/{descriptor}", None, flags, None, f"making {mount_point} read-only")
        finally:
            os.close(descriptor)


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), path)  # mountinfo escapes spaces as \040


def _mount_id(descriptor: int) -> int:
    with open(f"/proc/self/fdinfo/{descriptor}") as info:
        return next(int(line.split()[1]) for line in info if line.startswith("mnt_id:"))


def isolate_filesystem(filesystem: dict, owner: tuple[int, int]) -> str:
    """Read-only mounts, hidden directories, a private /tmp, /var/tmp and /dev/shm; returns the working directory.

    The interpreter's directories (`needed`) that lie in a covered directory are opened before anything covers them
    and bound back on top, read-only like the mounts they come from.
    """
    scratch = [path for path in dict.fromkeys(map(os.path.realpath, SCRATCH)) if os.path.isdir(path)]
    scratch = [path for path in scratch if path != os.path.realpath("/tmp")]
    covered = [*filesystem["hide"], "/tmp", *scratch]
    kept = [path for path in filesystem["needed"] if any(_within(path, directory) for directory in covered)]
    kept = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in kept}
    make_read_only()
    for directory in filesystem["hide"]:
        mount("attnres-hidden", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m", f"hiding {directory}")
        for path in kept:
            if _within(path, directory):
                os.makedirs(path, exist_ok=True)  # a mount point, made before the cover turns read-only
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
        mount(None, directory, None, flags, None, f"making the cover of {directory} read-only")
    # One tmpfs, so its size bounds all three: its subdirectories are bound onto /var/tmp, /dev/shm, then /tmp.
    options = f"mode=1777,size={filesystem['scratch_bytes']},nr_inodes={filesystem['scratch_files']}"
    mount("attnres-scratch", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, options, "giving the candidate a private /tmp")
    for index, target in enumerate([*scratch, "/tmp"]):
        source = f"/tmp/{index}"
        os.mkdir(source)
        os.chmod(source, 0o1777)
        mount(source, target, None, MS_BIND, None, f"giving the candidate a private {target}")
    for path, descriptor in kept.items():
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{descriptor}", path, None, MS_BIND | MS_REC, None, f"keeping {path}")
        os.close(descriptor)
    os.mkdir(WORKDIR)
    os.chown(WORKDIR, *owner)
    return WORKDIR


def _within(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def map_identity(candidate: int, identity: dict) -> None:
    """One user and one group in the candidate's user namespace: itself as seen from the supervisor's."""
    for kind, inside, outside in (("uid", "uid", "outer_uid"), ("gid", "gid", "outer_gid")):
        with open(f"/proc/{candidate}/{kind}_map", "w") as mapping:
            mapping.write(f"{identity[inside]} {identity[outside]} 1\n")


def drop_privileges(identity: dict) -> None:
    if identity["clear_groups"]:
        os.setgroups([])
    os.setresgid(identity["gid"], identity["gid"], identity["gid"])
    os.setresuid(identity["uid"], identity["uid"], identity["uid"])
    # The candidate's own user namespace gave it every capability there; none is left, and none comes back.
    capabilities = (CapabilitySet * 2)()
    check(libc.capset(ctypes.byref(CapabilityHeader(CAPABILITY_VERSION_3, 0)), capabilities), "dropping capabilities")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")


def run_candidate(config: dict, ready: int, go: int) -> None:
    identity = config["identity"]
    if identity is not None:
        check(libc.unshare(CLONE_NEWUSER), "entering a user namespace")
    os.write(ready, b"1")
    os.close(ready)
    workdir = os.read(go, 4096).decode()
    os.close(go)
    if not workdir:  # the supervisor failed and said why
        os._exit(1)
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    if identity is not None:
        drop_privileges(identity)
    nonce = os.read(config["nonce_fd"], 64)
    os.close(config["nonce_fd"])
    os.set_inheritable(config["result_fd"], False)  # programs the candidate executes do not get it
    for name, soft, hard in config["limits"]:
        limit = getattr(resource, name)
        ceiling = resource.getrlimit(limit)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(limit, (soft, hard))
    script = os.path.join(workdir, "candidate.py")
    sys.argv = [script]
    runpy.run_path(script, run_name="__main__")
    os.write(config["result_fd"], nonce)
    os._exit(0)


def supervise(config: dict) -> None:
    with open(config["program_fd"], "rb") as source:
        program = source.read()
    os.umask(0o022)  # directories made for kept paths must be traversable by the candidate
    ready_reader, ready_writer = os.pipe()
    go_reader, go_writer = os.pipe()
    candidate = os.fork()
    if candidate == 0:
        os.close(ready_reader)
        os.close(go_writer)
        run_candidate(config, ready_writer, go_reader)
    os.close(ready_writer)
    os.close(go_reader)
    os.close(config["nonce_fd"])
    os.close(config["result_fd"])
    if os.read(ready_reader, 1):  # nothing: the candidate could not enter its user namespace, and said why
        identity = config["identity"]
        if identity is not None:
            map_identity(candidate, identity)
        workdir = os.getcwd()
        if config["filesystem"] is not None:
            workdir = isolate_filesystem(config["filesystem"], (identity["outer_uid"], identity["outer_gid"]))
        with open(os.path.join(workdir, "candidate.py"), "wb") as script:
            script.write(program)
        os.write(go_writer, workdir.encode())
    os.close(go_writer)
    status = os.waitstatus_to_exitcode(os.waitpid(candidate, 0)[1])
    os._exit(status if status >= 0 else 128 - status)


if __name__ == "__main__":
    supervise(json.loads(sys.argv[1]))
