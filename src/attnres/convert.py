# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""Graft AttnRes onto a PreNorm checkpoint (`attnres convert`).

The grafted checkpoint holds the source's tensors unchanged (AttnRes keeps Llama's parameter names) plus one small
shard with the AttnRes parameters at their zero-query initialisation, which makes the new model compute the source's
function exactly (see `AttnResModel`). So the converter mostly copies bytes: source shards are validated from their
safetensors headers and copied as files, never loaded, unless a tensor must change (`--dtype`, pickled input, stray
rotary buffers), in which case one shard at a time is rewritten. Everything is written to a temporary directory next
to the destination, which replaces the destination only once complete.
"""

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.activations import ACT2FN
from transformers.dynamic_module_utils import custom_object_save

from .configuration_attnres import AttnResConfig
from .errors import AttnResError
from .families import SUPPORTED_FAMILIES, attnres_config_kwargs, unsupported_message
from .model_card import render_model_card, source_license
from .model_sources import loading_options, local_checkpoint, locate_model
from .modeling_attnres import AttnResForCausalLM
from .paths import check_link_inside, is_utf8, os_error_message, printable, staged_directory


logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The dtypes `--dtype` converts; tensors of any other dtype (integers, FP8 and its E8M0 scales, F64, ...) are carried
# through unchanged.
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
SAFETENSORS_REVERSE = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# Files that travel with the weights: the tokenizer, its chat template, generation defaults and license terms.
CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
CARRIED_PATTERNS = ("LICENSE*", "NOTICE*", "USE_POLICY*")
# Buffers some old Llama checkpoints saved although they are recomputed from the config: dropped, never an error.
DROPPABLE_SUFFIXES = (".rotary_emb.inv_freq",)
COPY_CHUNK_BYTES = 256 * 2**20
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim")  # fmt: skip
LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")
VERIFY_TEXT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'


class ConversionError(AttnResError):
    """The source, the destination or the options cannot be converted: the message says why and what to do."""


@dataclass
class SourceShard:
    """One weights file of the source, described by its header (nothing is loaded)."""

    path: Path
    tensors: dict[str, tuple[str, list[int]]]  # name -> (safetensors dtype, shape)
    pickled: bool = False
    dropped: list[str] = field(default_factory=list)


def graft(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    mode: str = "block",
    num_blocks: int | None = None,
    block_size: int | None = None,
    dtype: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Write an AttnRes checkpoint grafted onto the PreNorm causal LM `source` to `destination`.

    Args:
        source: a local checkpoint directory, a Hub id, or a GGUF file (or a directory holding one, without a
            config.json) of the Llama, Mistral, Qwen2 or Qwen3 family; GGUF weights are dequantized by transformers.
        destination: the directory to create. An existing non-empty one is refused unless `force`; a symbolic link is
            followed.
        mode: `"block"` (Block AttnRes) or `"full"` (Full AttnRes).
        num_blocks / block_size: the block partition (the paper's N, or decoder layers per block); default N = 8.
        dtype: `"float32"`, `"bfloat16"` or `"float16"` to convert the weights; default keeps the source's.
        allow_pickle: read `pytorch_model*.bin` weights (unpickling runs code from the file: only for trusted sources).
        revision: the Hub revision to download.
        progress: show a progress bar.
        command: how the conversion was invoked, for the model card.

    Returns:
        The destination directory. `AutoModelForCausalLM.from_pretrained(destination, trust_remote_code=True)`
        loads it and computes the source model's function.
    """
    if mode not in ("block", "full"):
        raise ConversionError(f"--mode must be 'block' or 'full', got {mode!r}")
    if num_blocks is not None and block_size is not None:
        raise ConversionError("give --num-blocks or --block-size, not both")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    located = locate_model(str(source), flag="SRC")
    destination = Path(destination).expanduser().absolute()
    for flag, path in (("SRC", located.directory), ("DST", destination)):
        if path is not None and not is_utf8(path):
            fix = "rename it, or link to it from a UTF-8 path" if flag == "SRC" else "choose a UTF-8 name"
            raise ConversionError(f"{flag} {str(path)!r} is not a UTF-8 path, and safetensors opens no other; {fix}")
    if located.hub_id is None:
        check_not_nested(located.directory or located.gguf_file, destination)
    command = command or f"attnres convert {source} {destination.name} --mode {mode}"
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "README.md", *CARRIED_PATTERNS]
    try:
        with (
            staged_directory(destination, force=force, flag="DST") as work_dir,
            local_checkpoint(
                located,
                revision=revision,
                allow_patterns=patterns + (["*.bin"] if allow_pickle else []),
                # a dequantized GGUF source lives inside the staging directory until it is removed
                scratch_dir=work_dir,
            ) as source_dir,
        ):
            source_config = read_source_config(source_dir)
            carried = carried_files(source_dir)
            shards = read_source_shards(source_dir, allow_pickle=allow_pickle)
            check_layers_match(source_config.num_hidden_layers, shards)  # before building a model of that depth
            config = build_config(source_config, mode=mode, num_blocks=num_blocks, block_size=block_size)
            with torch.device("meta"):
                model = AttnResForCausalLM(config)
            target_dtype = DTYPES[dtype] if dtype else source_dtype(source_config, shards)
            config.dtype = target_dtype
            config.architectures = [AttnResForCausalLM.__name__]
            if model.layout is not None and model.layout.moe:
                shards = [experts_fused_shard(source_dir, work_dir, source_dtype(source_config, shards))]
            check_tensors_match(model, shards, tie_word_embeddings=config.tie_word_embeddings)
            write_weights(model, shards, work_dir, target_dtype=target_dtype if dtype else None, progress=progress)
            for shard in shards:
                if shard.path.is_relative_to(work_dir):
                    shard.path.unlink()
            config.save_pretrained(work_dir)
            custom_object_save(model, work_dir, config=config)  # ships modeling_attnres.py (remote code)
            for path in carried:
                shutil.copyfile(path, work_dir / path.name)
            card = render_model_card(
                config,
                base_model=printable(located.hub_id or (located.gguf_file or located.directory).name),
                base_model_is_hub_id=located.hub_id is not None,
                license_fields=source_license(source_dir),
                command=printable(command),
                dtype=str(target_dtype).removeprefix("torch."),
                source_family=source_config.model_type,
            )
            (work_dir / "README.md").write_text(card)
    except OSError as error:  # reading SRC: errors writing DST are AttnResErrors already (`staged_directory`)
        raise ConversionError(f"cannot read SRC {source}: {os_error_message(error)}") from None
    return destination


def check_not_nested(source: Path, destination: Path) -> None:
    """DST may be neither inside SRC (a checkpoint directory) nor hold it (replacing DST would delete it)."""
    source_dir = source.resolve()
    # not Path.resolve, which raises on a link that loops (`staged_directory` refuses it in one line)
    resolved = Path(os.path.realpath(destination))
    if source_dir.is_dir() and (resolved == source_dir or resolved.is_relative_to(source_dir)):
        raise ConversionError(
            f"DST {str(destination)!r} is inside SRC {str(source_dir)!r}; choose a directory outside it"
        )
    if source_dir.is_relative_to(resolved):
        raise ConversionError(
            f"SRC {str(source_dir)!r} is inside DST {str(destination)!r}; replacing DST would delete it"
        )


# --- the source ------------------------------------------------------------------------------------------------------


def read_source_config(source_dir: Path):
    """The source's transformers config, for a family this converter maps; a config.json that is not one is an error
    that says what is wrong with it."""
    config_file = source_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"SRC {str(source_dir)!r} has no config.json: is it a transformers checkpoint?")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{config_file} is not valid JSON: {error}") from None
    except RecursionError:
        raise ConversionError(f"{config_file} nests too deeply to be a transformers config") from None
    if not isinstance(raw, dict):
        raise ConversionError(
            f"{config_file} must hold a JSON object (a transformers config), not {type(raw).__name__}"
        )
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_FAMILIES:
        raise ConversionError(unsupported_message(model_type if isinstance(model_type, str) else repr(model_type)))
    for name in SIZE_FIELDS:  # checked here: transformers' own checks fail on them with ZeroDivisionError and the like
        value = raw.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise ConversionError(f"{config_file}: {name} must be a positive integer, got {value!r}")
    try:
        return AutoConfig.from_pretrained(source_dir, trust_remote_code=False)  # its auto_map code never runs
    except (StrictDataclassError, ValueError, TypeError, KeyError, ArithmeticError, RecursionError) as error:
        # transformers' checks, and what a config too deeply nested for them provokes
        raise ConversionError(f"{config_file} is not a valid {model_type} config: {one_line(error)}") from None


def build_config(source_config, *, mode: str, num_blocks: int | None, block_size: int | None) -> AttnResConfig:
    layers = source_config.num_hidden_layers
    for flag, value in (("--num-blocks", num_blocks), ("--block-size", block_size)):
        if value is not None and not 1 <= value <= layers:
            raise ConversionError(
                f"{flag} must be between 1 and the source's number of layers ({layers}), got {value}"
            )
    for name in ("hidden_act", "hidden_activation"):  # Gemma 2 and 3 name it hidden_activation
        activation = getattr(source_config, name, None)
        if activation is not None and activation not in ACT2FN:
            raise ConversionError(f"config.json: {name} {activation!r} is not an activation transformers knows")
    try:
        return AttnResConfig(
            **attnres_config_kwargs(source_config),
            residual_mode=mode,
            attn_res_num_blocks=num_blocks,
            attn_res_block_size=block_size,
        )
    except StrictDataclassError as error:
        raise ConversionError(f"config.json: {one_line(error)}") from None


def one_line(error: BaseException) -> str:
    """An exception's message on one line (validation errors of configs span several)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def read_source_shards(source_dir: Path, *, allow_pickle: bool) -> list[SourceShard]:
    """The source's weight files with their tensor names, dtypes and shapes, validated from the headers."""
    index = source_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_weight_map(index)
        files = sorted(set(weight_map.values()))
    elif (source_dir / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        pickled = sorted(source_dir.glob("pytorch_model*.bin"))
        if not pickled:
            raise ConversionError(
                f"SRC {str(source_dir)!r} has no weights: expected model.safetensors or model.safetensors.index.json"
            )
        if not allow_pickle:
            raise ConversionError(
                f"SRC {str(source_dir)!r} has only pickled weights ({pickled[0].name}); unpickling can run code from "
                "the file. Pass --allow-pickle if you trust it, or convert it to safetensors first."
            )
        return [read_pickled_shard(path) for path in pickled]

    shards = []
    for name in files:
        path = source_dir / name
        if not path.is_file():
            raise ConversionError(f"the safetensors index lists {name}, which is missing from {source_dir}")
        try:
            with safe_open(path, framework="pt") as reader:
                tensors = {
                    key: (reader.get_slice(key).get_dtype(), reader.get_slice(key).get_shape())
                    for key in reader.keys()  # noqa: SIM118 (safe_open readers are not dicts)
                }
        except SafetensorError as error:
            raise ConversionError(f"{path} is not a valid safetensors file (corrupt or truncated?): {error}") from None
        if weight_map is not None:
            listed = {key for key, file in weight_map.items() if file == name}
            if listed != set(tensors):
                raise ConversionError(f"{path.name} does not hold the tensors the index lists for it")
        shards.append(SourceShard(path=path, tensors=tensors))
    return shards


def read_weight_map(index: Path) -> dict[str, str]:
    """The index's tensor -> file map, checked: plain file names of SRC's own directory only, never a path that leaves
    it (`../other/model.safetensors` or an absolute path would copy someone else's file into DST)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError) as error:
        raise ConversionError(f"{index} is not a valid safetensors index ({error})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
        raise ConversionError(f"{index}: 'weight_map' must map tensor names to file names")
    for file in set(weight_map.values()):
        if Path(file).name != file or file in ("", ".", ".."):
            raise ConversionError(f"{index} points to {file!r}, outside SRC; an index may only name files beside it")
    return weight_map


def read_pickled_shard(path: Path) -> SourceShard:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch's unpickler raises what the bytes provoke (UnpicklingError, RuntimeError, ...)
        raise ConversionError(f"{path} is not a readable PyTorch weights file: {str(error).splitlines()[0]}") from None
    tensors = {key: (SAFETENSORS_REVERSE.get(t.dtype, str(t.dtype)), list(t.shape)) for key, t in state_dict.items()}
    return SourceShard(path=path, tensors=tensors, pickled=True)


def experts_fused_shard(source_dir: Path, work_dir: Path, dtype: torch.dtype) -> SourceShard:
    """The source's weights as its family's modules hold them, in one shard in `work_dir`.

    transformers saves sparse MoE checkpoints with one tensor per expert and projection (`experts.3.gate_proj`), and
    loads them into one tensor per layer (`experts.gate_up_proj`) by the conversion it registers for the family's
    model_type, which a remote-code model does not get. So the source is loaded by transformers (all of it at once:
    memory for one copy of the model) and written in the layout the graft's modules, the family's, load unchanged."""
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=dtype, **loading_options())
    state_dict = source.state_dict()
    if source.config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)  # the same tensor as the embeddings, which safetensors stores once
    path = work_dir / "source-experts-fused.safetensors"
    save_shard({name: tensor.contiguous() for name, tensor in state_dict.items()}, path)
    tensors = {name: (SAFETENSORS_REVERSE[tensor.dtype], list(tensor.shape)) for name, tensor in state_dict.items()}
    return SourceShard(path=path, tensors=tensors)


def check_layers_match(num_hidden_layers: int, shards: list[SourceShard]) -> None:
    """The weights hold exactly the decoder layers config.json declares (checked from the tensor names, so that a
    config claiming 100,000 layers is refused before a model of that depth is built)."""
    layers = {int(match[1]) for shard in shards for name in shard.tensors if (match := LAYER_INDEX.match(name))}
    if layers != set(range(num_hidden_layers)):
        found = (
            f"layers 0-{max(layers)}"
            if layers == set(range(len(layers))) and layers
            else f"{len(layers)} layer index(es)"
        )
        raise ConversionError(
            f"config.json declares num_hidden_layers={num_hidden_layers} but the weights hold {found}: does "
            "config.json describe these weights?"
        )


def source_dtype(source_config, shards: list[SourceShard]) -> torch.dtype:
    """The dtype the AttnRes parameters are stored in when none is asked for: the embeddings'."""
    for shard in shards:
        if "model.embed_tokens.weight" in shard.tensors:
            return SAFETENSORS_DTYPES.get(shard.tensors["model.embed_tokens.weight"][0], torch.float32)
    return getattr(source_config, "dtype", None) or torch.float32


def check_tensors_match(model: AttnResForCausalLM, shards: list[SourceShard], *, tie_word_embeddings: bool) -> None:
    """Every tensor the model needs (but the AttnRes ones) is in the source with the right shape; nothing else is."""
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    attnres = set(model.attn_res_parameters())
    found: dict[str, list[int]] = {}
    for shard in shards:
        for name, (_, shape) in shard.tensors.items():
            if name.endswith(DROPPABLE_SUFFIXES):
                shard.dropped.append(name)
            else:
                found[name] = shape
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ConversionError(
            f"the source has {len(unexpected)} tensor(s) a {model.config.num_hidden_layers}-layer model of this "
            f"family does not, e.g. {unexpected[:3]}: does config.json describe these weights?"
        )
    optional = attnres | ({"lm_head.weight"} if tie_word_embeddings else set())
    missing = sorted(set(expected) - set(found) - optional)
    if missing:
        raise ConversionError(f"the source lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    wrong = [f"{name} {found[name]} (expected {expected[name]})" for name in found if found[name] != expected[name]]
    if wrong:
        raise ConversionError(f"{len(wrong)} tensor(s) have the wrong shape for config.json, e.g. {wrong[:2]}")
    present_attnres = attnres & set(found)
    if present_attnres:
        raise ConversionError(f"the source already has AttnRes parameters ({sorted(present_attnres)[0]}, ...)")


# --- writing ---------------------------------------------------------------------------------------------------------


def write_weights(
    model: AttnResForCausalLM,
    shards: list[SourceShard],
    work_dir: Path,
    *,
    target_dtype: torch.dtype | None,
    progress: bool,
) -> None:
    """The source shards (copied, or rewritten one at a time when a tensor changes), then a last shard with the
    AttnRes parameters, and the index that maps every tensor to its file, as `save_pretrained` writes them."""
    count = len(shards) + 1
    names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    weight_map: dict[str, str] = {}
    total_size = 0
    with tqdm(
        total=sum(shard.path.stat().st_size for shard in shards),
        unit="B",
        unit_scale=True,
        desc="Grafting AttnRes",
        disable=not progress,
    ) as bar:
        for shard, name in zip(shards, names):
            kept = [key for key in shard.tensors if key not in shard.dropped]
            if shard.pickled or shard.dropped or needs_cast(shard, target_dtype):
                total_size += rewrite_shard(shard, work_dir / name, kept, target_dtype)
                bar.update(shard.path.stat().st_size)
            else:
                copy_file(shard.path, work_dir / name, bar)
                total_size += tensor_bytes(shard.path)
            weight_map.update(dict.fromkeys(kept, name))

        attnres = initial_attn_res_tensors(model, target_dtype or model.config.dtype)
        save_shard(attnres, work_dir / names[-1])
        total_size += sum(t.numel() * t.element_size() for t in attnres.values())
        weight_map.update(dict.fromkeys(attnres, names[-1]))

    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (work_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def needs_cast(shard: SourceShard, target_dtype: torch.dtype | None) -> bool:
    return target_dtype is not None and any(
        SAFETENSORS_DTYPES.get(dtype) not in (None, target_dtype) for dtype, _ in shard.tensors.values()
    )


def rewrite_shard(shard: SourceShard, path: Path, keys: Iterable[str], target_dtype: torch.dtype | None) -> int:
    """Load one source shard, cast its float32/bfloat16/float16 tensors to `target_dtype` (others are carried
    unchanged, as `needs_cast` expects), drop what is not kept, save it."""

    def converted(tensor: torch.Tensor) -> torch.Tensor:
        if target_dtype is not None and tensor.dtype in SAFETENSORS_DTYPES.values():
            tensor = tensor.to(target_dtype)
        return tensor.contiguous()

    # Cast each tensor as it is read, so only the output shard (and one input tensor) is ever in memory.
    if shard.pickled:
        state_dict = torch.load(shard.path, map_location="cpu", weights_only=True, mmap=True)
        tensors = {key: converted(state_dict[key]) for key in keys}
    else:
        tensors = {}
        with safe_open(shard.path, framework="pt") as reader:
            for key in keys:
                try:
                    tensors[key] = converted(reader.get_tensor(key))
                except (AttributeError, TypeError, SafetensorError) as error:  # a dtype this torch has no type for
                    raise ConversionError(
                        f"{shard.path.name}: torch {torch.__version__} cannot read {key} ({shard.tensors[key][0]}: "
                        f"{error}), and this shard must be rewritten (--dtype, or buffers to drop); upgrade torch or "
                        "convert without --dtype"
                    ) from None
    save_shard(tensors, path)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`save_file`, with its I/O errors as OSError: safetensors reports them as SafetensorError with the system's error
    number only in the text ("... (os error 28)"), and a full disk must be told from a bug."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as error:
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def copy_file(source: Path, destination: Path, bar: tqdm) -> None:
    """Copy bytes kernel-side (copy_file_range, as `cp` does), advancing the progress bar as it goes."""
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        try:
            while copied := os.copy_file_range(reader.fileno(), writer.fileno(), COPY_CHUNK_BYTES):
                bar.update(copied)
        except OSError:  # a filesystem without copy_file_range: plain buffered copy from where it stopped
            writer.seek(reader.tell())
            while chunk := reader.read(COPY_CHUNK_BYTES):
                writer.write(chunk)
                bar.update(len(chunk))


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (as the index's `total_size` counts them), from the data offsets of
    its header (checked by `safe_open` before): right for every dtype the format has, including those that torch
    gives no element size for in every supported release (U16, U32, U64, C64, F8_E8M0, ...)."""
    with open(path, "rb") as reader:
        header = json.loads(reader.read(int.from_bytes(reader.read(8), "little")))
    offsets = [entry["data_offsets"] for name, entry in header.items() if name != "__metadata__"]
    return sum(end - begin for begin, end in offsets)


def initial_attn_res_tensors(model: AttnResForCausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The AttnRes parameters as the model initialises them (zero pseudo-queries, unit key norms), materialised from
    the meta device one small module at a time through the model's own `_init_weights`."""
    tensors = {}
    parameters = model.attn_res_parameters()
    for module_name, module in model.named_modules():
        own = {f"{module_name}.{name}" for name, _ in module.named_parameters(recurse=False)}
        if own and own <= set(parameters):
            module.to_empty(device="cpu")
            model._init_weights(module)
            for name, param in module.named_parameters(recurse=False):
                tensors[f"{module_name}.{name}"] = param.detach().to(dtype).contiguous()
    return tensors


def carried_files(source_dir: Path) -> list[Path]:
    """The files of SRC that travel with the weights (`CARRIED_FILES`, `CARRIED_PATTERNS`), checked before anything is
    written: a symbolic link among them must stay inside SRC (in a Hugging Face cache snapshot, whose files are links
    to `../../blobs/`, inside the repository's blobs), or a file from elsewhere would be published with the graft."""
    names = set(CARRIED_FILES)
    for pattern in CARRIED_PATTERNS:
        names.update(path.name for path in source_dir.glob(pattern))
    roots = [source_dir]
    if source_dir.parent.name == "snapshots":
        roots.append(source_dir.parent.parent / "blobs")
    files = [source_dir / name for name in sorted(names) if (source_dir / name).is_file()]
    for path in files:
        check_link_inside(path, roots, f"SRC file {path.name}")
    return files


# --- verification ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def verify_graft(
    source: str | os.PathLike, destination: str | os.PathLike, *, text: str = VERIFY_TEXT, max_new_tokens: int = 16
) -> dict:
    """Load the source and the grafted checkpoint in fp32 (both at once: memory for two fp32 models) and compare them
    on `text`: the largest logit difference and whether greedy decoding produces the same tokens."""
    located = locate_model(str(source), flag="SRC")
    destination = Path(destination)
    if any((destination / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(destination, trust_remote_code=False)
            input_ids = tokenizer(text, return_tensors="pt").input_ids
        except Exception as error:  # tokenizers and transformers raise what the files provoke (JSONDecodeError, ...)
            raise ConversionError(
                f"--verify cannot load the tokenizer carried from SRC into {destination} ({type(error).__name__}: "
                f"{one_line(error)}); fix SRC's tokenizer files and convert again"
            ) from None
    else:  # no tokenizer: any token ids make the comparison
        input_ids = torch.arange(32)[None] % AttnResConfig.from_pretrained(destination).vocab_size
    base = AutoModelForCausalLM.from_pretrained(
        **located.from_pretrained_kwargs(), dtype=torch.float32, **loading_options()
    ).eval()
    grafted = AttnResForCausalLM.from_pretrained(destination, dtype=torch.float32, **loading_options()).eval()
    diff = (grafted(input_ids).logits - base(input_ids).logits).abs().max().item()
    generation = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=base.config.eos_token_id)
    base_tokens = base.generate(input_ids, **generation)
    grafted_tokens = grafted.generate(input_ids, **generation)
    return {
        "tokens": input_ids.shape[1],
        "max_abs_logit_diff": diff,
        "greedy_identical": bool(torch.equal(base_tokens, grafted_tokens)),
    }
