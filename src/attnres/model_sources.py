# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The models users name on the command line: a local checkpoint directory, a GGUF file, or a Hub id, told apart
once (`locate_model`) and turned into a local transformers checkpoint when one is needed (`local_checkpoint`)."""

import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import AttnResError
from .paths import check_link_inside, is_missing_local_path, os_error_message


logger = logging.getLogger(__name__)

# The files `save_pretrained` ships with every AttnRes checkpoint as remote code (modeling_attnres.py imports the
# others relatively; the Triton files load only where triton does).
REMOTE_CODE_FILES = (
    "configuration_attnres.py",
    "modeling_attnres.py",
    "attnres_triton.py",
)


@dataclass(frozen=True)
class ModelSource:
    """A model the user named, located: exactly one of `directory`, `gguf_file` and `hub_id` is set."""

    name: str
    directory: Path | None = None  # a local checkpoint (holds config.json), or tokenizer (`locate_tokenizer`)
    gguf_file: Path | None = None
    hub_id: str | None = None

    def from_pretrained_kwargs(self) -> dict:
        """What `from_pretrained` needs to load it: the path or id, and the GGUF file's name for a GGUF source."""
        if self.gguf_file is not None:
            return {"pretrained_model_name_or_path": str(self.gguf_file.parent), "gguf_file": self.gguf_file.name}
        return {"pretrained_model_name_or_path": str(self.directory or self.hub_id)}


def loading_options(*, use_kernels: bool = False, trust_remote_code: bool = False) -> dict:
    """Options of every model load this project makes.

    - `use_kernels`: transformers 5.25 made Hub kernels the default (`use_kernels=None` means `True` unless
      `USE_HUB_KERNELS` says otherwise): on an accelerator, layers such as SiLU are then swapped for kernels downloaded
      from the Hub at load time, which fails offline and would run a comparison with kernels the user never chose.
      Every release this project supports (5.4 and newer) takes `use_kernels`, so it is always passed: `False` unless
      the user asked (`--use-kernels`).
    - `trust_remote_code`: the Python files a checkpoint's `auto_map` names run only if the user said so
      (`--trust-remote-code`). AttnRes checkpoints need none: `import attnres` registers the installed classes
      (`check_model_code` says when a checkpoint ships different ones)."""
    if use_kernels and importlib.util.find_spec("kernels") is None:
        raise AttnResError(
            "--use-kernels needs the kernels package (a dependency of transformers 5.25+): pip install kernels"
        )
    return {"use_kernels": use_kernels, "trust_remote_code": trust_remote_code}


def check_model_code(source: "ModelSource", *, flag: str, trust_remote_code: bool) -> None:
    """Before a local checkpoint loads, say which code will run where its config.json names its own (`auto_map`).

    - An AttnRes checkpoint runs the installed attnres classes; if the `.py` files it ships differ from them, one line
      says so (with `--trust-remote-code`, transformers decides: 5.4 runs the shipped files, 5.25 prefers the classes
      `import attnres` registered).
    - Another model type that transformers knows runs transformers' classes without `--trust-remote-code`: one line
      says that the checkpoint's own code is ignored.
    - A model type that only its own code defines cannot load without `--trust-remote-code`: refused, naming the flag.

    A Hub id is not read here: transformers reads its config and, for code it would have to run, refuses with the same
    advice."""
    if source.directory is None:
        return
    try:
        config = json.loads((source.directory / "config.json").read_text())
    except (OSError, ValueError):
        return  # unreadable: the load itself reports it
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map:
        return
    model_type = config.get("model_type")
    if model_type == "attnres":
        installed = Path(__file__).parent
        differing = [
            name
            for name in REMOTE_CODE_FILES
            if (source.directory / name).is_file()
            and (source.directory / name).read_bytes() != (installed / name).read_bytes()
        ]
        if differing:
            # With consent, which runs is transformers' choice: 5.25 prefers registered classes, 5.4 the shipped ones.
            runs = (
                "transformers may run the shipped files (--trust-remote-code)"
                if trust_remote_code
                else ("the installed code runs")
            )
            logger.warning(
                "%s %s ships %s that differ from those of the installed attnres; %s",
                flag, source.name, ", ".join(differing), runs,
            )  # fmt: skip
        return
    if trust_remote_code:
        return
    from transformers import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        logger.warning(
            "%s %s: its config.json names code of its own (auto_map), which runs only with --trust-remote-code; "
            "transformers' built-in %r classes are used instead",
            flag, source.name, model_type,
        )  # fmt: skip
        return
    raise AttnResError(
        f"{flag} {source.name!r} is a {model_type!r} model defined only by the Python code it ships (config.json "
        "auto_map), which attnres runs only with --trust-remote-code; pass it if you trust that code"
    )


def locate_model(name: str, *, flag: str = "model") -> ModelSource:
    """Tell a checkpoint directory, a GGUF file (or a directory holding exactly one, without a config.json) and a Hub
    id apart; anything else is an `AttnResError` that names `flag` and says what was expected."""
    path = Path(name).expanduser()
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        pass  # no local path (a Hub id, or a path that does not exist: below)
    except OSError as error:  # a name too long, a symbolic link that loops, ...
        raise AttnResError(f"{flag} {name!r}: {os_error_message(error)}") from None
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource(name, gguf_file=path.absolute())
        raise AttnResError(f"{flag} {name!r} is a file; give a checkpoint directory, a .gguf file or a Hub id")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(name, directory=path.absolute())
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return ModelSource(name, gguf_file=found[0].absolute())
        detail = f"holds {len(found)} .gguf files; name the one to use" if found else "has no config.json"
        raise AttnResError(f"{flag} {name!r} {detail}: a transformers checkpoint directory was expected")
    if is_missing_local_path(name):
        raise AttnResError(
            f"{flag} {name!r} does not exist (expected a checkpoint directory, a .gguf file or a Hub id)"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise AttnResError(f"{flag} {name!r} does not exist locally and is not a valid Hub id") from None
    return ModelSource(name, hub_id=name)


def locate_tokenizer(name: str, *, flag: str) -> ModelSource:
    """`locate_model` for a tokenizer: any local directory (tokenizer files need no config.json beside them), else
    what `locate_model` makes of `name` (a Hub id, or one line on a path that does not exist)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(name, directory=path.absolute())
    return locate_model(name, flag=flag)


@contextmanager
def local_checkpoint(
    source: ModelSource,
    *,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    scratch_dir: Path | None = None,
) -> Iterator[Path]:
    """A local transformers checkpoint directory for `source`: the directory itself, the Hub's download (only the
    files `allow_patterns` names), or the GGUF file dequantized into a temporary directory in `scratch_dir` (default:
    the system's), removed afterwards."""
    if source.directory is not None:
        yield source.directory
    elif source.hub_id is not None:
        yield download(source.hub_id, revision=revision, allow_patterns=allow_patterns)
    else:
        with tempfile.TemporaryDirectory(prefix=".attnres-gguf-", dir=scratch_dir) as plain:
            dequantize_gguf(source.gguf_file, Path(plain))
            yield Path(plain)


def download(hub_id: str, *, revision: str | None, allow_patterns: list[str] | None, flag: str | None = None) -> Path:
    """The Hub's snapshot of `hub_id` (only the files `allow_patterns` names), from the local Hub cache when it holds
    them; an `AttnResError` (naming `flag`, if given) when it cannot be had."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=allow_patterns))
    except Exception as error:  # offline, 404, gated, ...: the Hub's message says which
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        named = f"{flag} {hub_id!r}" if flag else repr(hub_id)
        raise AttnResError(f"{named} is not a local path and could not be downloaded from the Hub: {reason}") from None


def check_available(source: ModelSource, *, flag: str) -> None:
    """Refuse a Hub id that cannot be had (offline and not in the Hub cache, a typo, a gated or private repository)
    before anything loads, in one line that says why (offline, the Hub's message names HF_HUB_OFFLINE). Only its
    config.json is fetched, which the load would fetch first anyway; local sources are `locate_model`'s to check."""
    if source.hub_id is not None:
        download(source.hub_id, revision=None, allow_patterns=["config.json"], flag=flag)


# What `save_pretrained` writes for a tokenizer (tokenizer_config.json with tokenizer.json, or the vocabulary files of
# a tokenizer without a fast backend: vocab.json and merges.txt, vocab.txt, a sentencepiece *.model, tekken.json).
TOKENIZER_FILE_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "*.model", "tekken.json")


def has_tokenizer_files(directory: Path) -> bool:
    return any(any(directory.glob(pattern)) for pattern in TOKENIZER_FILE_PATTERNS)


def check_tokenizer(source: ModelSource, *, flag: str, fix: str) -> None:
    """Refuse a local checkpoint directory without any tokenizer file before anything loads: `AutoTokenizer` would
    fail deep inside, with a message about its fallbacks (transformers 5.25: "Couldn't instantiate the backend
    tokenizer"; 5.4: protobuf is missing). `fix` says what to do instead, in the command's terms. A GGUF file carries
    its tokenizer, and a Hub id's files are the Hub's (`check_available`)."""
    if source.directory is not None and not has_tokenizer_files(source.directory):
        raise AttnResError(
            f"{flag} {source.name!r} has no tokenizer files (tokenizer_config.json, tokenizer.json or vocabulary "
            f"files); {fix}"
        )


def dequantize_gguf(gguf_file: Path, output: Path) -> None:
    """Write `output` as a plain transformers checkpoint (fp32 safetensors, config, tokenizer with its chat template)
    from a GGUF file, which transformers reads and dequantizes (`gguf_file=`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise AttnResError("reading GGUF files needs the gguf package: pip install 'attnres[gguf]'")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, **loading_options()
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as error:  # gguf raises what its parser meets (struct.error, KeyError, ValueError, ...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AttnResError(f"cannot read {gguf_file.name} as a transformers causal LM: {reason}") from None
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf"): rebuild it without the quantization
    # record, sharing the dequantized tensors.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    with torch.device("meta"):
        plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.save_pretrained(output)
    tokenizer.save_pretrained(output)
    check_saved_tokenizer(tokenizer, output, gguf_file.name)
    license_file = gguf_file.parent / "LICENSE"
    if license_file.is_file():
        check_link_inside(license_file, [gguf_file.parent], f"the LICENSE beside {gguf_file.name}")
        shutil.copyfile(license_file, output / "LICENSE")


# Words, numbers, code, whitespace runs and accents: text that a wrongly saved tokenizer splits differently.
TOKENIZER_PROBE = "The quick brown fox costs 3.14 euros.\n\ndef square(x):\n    return x ** 2  # ünïcödé, 東京"


def check_saved_tokenizer(tokenizer, directory: Path, source_name: str) -> None:
    """Refuse tokenizer files in `directory` that do not load back as `tokenizer` (the one transformers converted from
    `source_name`): transformers 5.4 converts Gemma 3's GGUF tokenizer to a Unigram model whose saved tokenizer.json
    reloads splitting text into single characters."""
    from transformers import AutoTokenizer, __version__

    expected = tokenizer(TOKENIZER_PROBE)["input_ids"]
    reloaded = AutoTokenizer.from_pretrained(directory)(TOKENIZER_PROBE)["input_ids"]
    if reloaded != expected:
        raise AttnResError(
            f"the tokenizer that transformers {__version__} converts from {source_name} does not load back from the "
            f"files it saves ({len(expected)} tokens for a test sentence, {len(reloaded)} after saving); another "
            "transformers release may convert it correctly"
        )
