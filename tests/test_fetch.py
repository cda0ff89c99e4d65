"""`attnres fetch`: a known model's file joined from wheels, checked against its size and sha256 while it is written,
and cached. Offline: the wheels are local files, which pip "downloads" (copies and validates) as it would from PyPI."""

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from attnres import fetch
from attnres.cli import main
from attnres.paths import STAGING_MARKER, process_identity
from tests.conftest import run_cli_on_a_tmpfs


PUBLISHED = bytes(range(256)) * 4096  # the file the test model's publisher gives: 1 MiB
NAME = "tiny-test-model"


def write_wheel(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> str:
    """A wheel pip accepts (it checks the .dist-info), holding `members`; returns it as a pip requirement."""
    name, version = path.name.split("-")[:2]
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\n"
                         f"Version: {version}\n")  # fmt: skip
        archive.writestr(f"{name}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nTag: py3-none-any\n")
        for member, data in members.items():
            archive.writestr(member, data)
    return str(path)


def known_model(wheels: Path, halves: tuple[bytes, bytes] | None = None) -> fetch.KnownModel:
    """The published file split across two wheels (or `halves` in their place, to make them wrong)."""
    wheels.mkdir(exist_ok=True)
    first, second = halves or (PUBLISHED[: len(PUBLISHED) // 2], PUBLISHED[len(PUBLISHED) // 2 :])
    parts = tuple(
        fetch.Part(
            write_wheel(wheels / f"tiny_part{i}-1.0-py3-none-any.whl", {f"tiny_part{i}/data.bin": data}),
            f"tiny_part{i}/data.bin",
        )  # fmt: skip
        for i, data in ((1, first), (2, second))
    )
    sha256 = hashlib.sha256(PUBLISHED).hexdigest()
    return fetch.KnownModel(NAME, "a test file", "tiny.gguf", len(PUBLISHED), sha256, parts, "org/tiny")


@pytest.fixture
def register(monkeypatch):
    """Make `attnres fetch` know a test model (the registry is this project's own dict, not a library's)."""

    def add(model: fetch.KnownModel) -> fetch.KnownModel:
        monkeypatch.setitem(fetch.KNOWN_MODELS, model.name, model)
        return model

    return add


def test_fetch_joins_checks_and_caches_the_file(tmp_path, register, capsys):
    model = register(known_model(tmp_path / "wheels"))
    cache = tmp_path / "cache"
    assert main(["fetch", NAME, "--cache-dir", str(cache)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == cache / NAME / "tiny.gguf" and path.read_bytes() == PUBLISHED
    assert sorted(p.name for p in (cache / NAME).iterdir()) == ["tiny.gguf"]  # no download directory, no wheel
    for part in model.parts:
        Path(part.requirement).unlink()  # nothing left to download: the verified file is reused
    assert main(["fetch", NAME, "--cache-dir", str(cache)]) == 0 and capsys.readouterr().out.strip() == str(path)


def _without_member(tmp_path):
    model = known_model(tmp_path / "wheels")
    write_wheel(Path(model.parts[1].requirement), {"tiny_part2/other.bin": b"x"})
    return model


def _corrupt_member(tmp_path):
    """A member whose stored bytes do not match its CRC (pip checks only the .dist-info)."""
    model = known_model(tmp_path / "wheels")
    wheel = Path(model.parts[0].requirement)
    write_wheel(wheel, {"tiny_part1/data.bin": PUBLISHED[: len(PUBLISHED) // 2]}, zipfile.ZIP_STORED)
    data = bytearray(wheel.read_bytes())
    data[data.index(PUBLISHED[:64]) + 1000] ^= 0xFF
    wheel.write_bytes(bytes(data))
    return model


BAD_FETCHES = {
    "wheel without the file": (_without_member, "tiny_part2-1.0-py3-none-any.whl has no tiny_part2/data.bin"),
    "corrupt wheel": (_corrupt_member, "tiny_part1-1.0-py3-none-any.whl is not a valid wheel"),
    "part larger than the file": (
        lambda tmp: known_model(tmp / "wheels", (bytes(64 << 20), b"")),
        "holds more than the 1,048,576 bytes of tiny.gguf: it is not the published file",
    ),
    "different bytes": (
        lambda tmp: known_model(tmp / "wheels", (bytes(len(PUBLISHED) // 2), PUBLISHED[len(PUBLISHED) // 2 :])),
        "is not the published file (1,048,576 bytes, sha256 ",
    ),
    "file too short": (
        lambda tmp: known_model(tmp / "wheels", (PUBLISHED[:1000], b"")),
        "is not the published file (1,000 bytes",
    ),
    "wheel not on the index": (
        lambda tmp: fetch.KnownModel(
            NAME, "", "tiny.gguf", 1, "0" * 64, (fetch.Part(str(tmp / "missing.whl"), "x"),), "org/tiny"
        ),  # fmt: skip
        "pip could not download",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FETCHES))
def test_bad_wheels_are_one_line_and_leave_nothing(tmp_path, register, capsys, case):
    make_model, message = BAD_FETCHES[case]
    register(make_model(tmp_path))
    capsys.readouterr()
    assert main(["fetch", NAME, "--cache-dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("attnres: error: ") and message in err and err.count("\n") == 1, err
    assert "nothing was kept" in err or case == "wheel not on the index"
    assert list((tmp_path / "cache" / NAME).iterdir()) == []


def test_a_cache_that_is_a_file_is_one_line(tmp_path, register, capsys):
    register(known_model(tmp_path / "wheels"))
    (tmp_path / "cache").write_text("mine")
    assert main(["fetch", NAME, "--cache-dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"attnres: error: cannot use the cache {tmp_path / 'cache' / NAME}: Not a directory") and (
        err.count("\n") == 1
    ), err
    assert (tmp_path / "cache").read_text() == "mine"


def test_a_read_only_cache_is_one_line(tmp_path):
    """A real model's name: the cache is refused before anything is downloaded."""
    cache = tmp_path / "cache"
    result = run_cli_on_a_tmpfs(cache, "ro", ["fetch", "smollm2-135m-instruct", "--cache-dir", str(cache)])
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.startswith(f"attnres: error: cannot use the cache {cache / 'smollm2-135m-instruct'}: ")
    assert "Read-only file system" in result.stderr and result.stderr.count("\n") == 1, result.stderr


FETCH_UNDER_A_FILE_SIZE_LIMIT = """
import json, resource, sys
from attnres import fetch
from attnres.cli import main

spec = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (spec["limit"], spec["limit"]))  # Python ignores SIGXFSZ: writes get EFBIG
fetch.KNOWN_MODELS[spec["name"]] = fetch.KnownModel(*spec["model"][:5], tuple(fetch.Part(*p) for p in spec["parts"]),
                                                    spec["model"][5])
sys.exit(main(["fetch", spec["name"], "--cache-dir", spec["cache"]]))
"""


def test_a_download_stops_at_the_published_size(tmp_path):
    """A wheel whose member is 64 MiB (zeros, 64 KiB compressed) for a 1 MiB file: the join stops at 1 MiB, so a
    process that may write no file above 4 MiB gets the one-line refusal, not a write error."""
    model = known_model(tmp_path / "wheels", (bytes(64 << 20), b""))
    spec = {
        "name": NAME,
        "model": [model.name, model.description, model.filename, model.size, model.sha256, model.base_model],
        "parts": [[part.requirement, part.member] for part in model.parts],
        "cache": str(tmp_path / "cache"),
        "limit": 4 << 20,
    }
    result = subprocess.run([sys.executable, "-c", FETCH_UNDER_A_FILE_SIZE_LIMIT, json.dumps(spec)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert "holds more than the 1,048,576 bytes of tiny.gguf" in result.stderr
    assert list((tmp_path / "cache" / NAME).iterdir()) == []


def test_downloads_of_dead_processes_are_removed(tmp_path, register):
    """SIGKILL leaves a download directory behind; the next fetch removes it, and only it: not one whose process still
    runs, nor a directory without the marker."""
    register(known_model(tmp_path / "wheels"))
    directory = tmp_path / "cache" / NAME
    directory.mkdir(parents=True)
    identify = "import json; from attnres.paths import process_identity; print(json.dumps(process_identity()))"
    finished = subprocess.run([sys.executable, "-c", identify], capture_output=True, text=True)  # then it is gone
    stale, alive, unmarked = (directory / f".download-{name}" for name in ("stale", "alive", "unmarked"))
    for download, owner in ((stale, json.loads(finished.stdout)), (alive, process_identity())):
        download.mkdir()
        (download / STAGING_MARKER).write_text(json.dumps(owner))
        (download / "tiny.gguf").write_bytes(PUBLISHED[:1000])
    unmarked.mkdir()
    assert main(["fetch", NAME, "--cache-dir", str(tmp_path / "cache")]) == 0
    assert not stale.exists() and alive.exists() and unmarked.exists()
    assert (directory / "tiny.gguf").read_bytes() == PUBLISHED
