"""Count what one step of a model costs in operator launches and bytes moved, against transformers' Llama.

Timings on a shared CPU move by percents from run to run; counts do not. On a GPU, eager decoding of a small model
is bound by kernel launches and training at a large batch by memory traffic, so the two counts below are what a GPU
user pays for the AttnRes path, measured on any machine, deterministically.

What is counted (`OperatorCounter`): every operator call that reaches PyTorch's dispatcher below autograd (a
`TorchDispatchMode`, so the backward's operators are counted too, and composite operators are counted as the
operators they decompose into), except those that launch no kernel:

- views: operators whose schema says every returned tensor aliases an input without writing it (`view`,
  `transpose`, `expand`, `select`, `slice`, `unbind`, `detach`, `alias`, ...), and `_unsafe_view`, a view whose
  schema does not say so (matmul's reshape of its product);
- allocations that fill nothing (`empty`, `empty_strided`, `new_empty`, `new_empty_strided`, `empty_like`);
- `lift_fresh`, which returns its argument.

One operator counts as one launch. That is the number of dispatches an eager step makes, which is what a GPU pays
per kernel; a few operators launch more than one kernel there (`slice_backward` fills zeros, then copies), and on a
CPU nothing is launched at all. A custom operator registered with `torch.library` (a Triton kernel behind
`torch.library.triton_op`) is counted like an aten one; a kernel launched from Python outside the dispatcher is
invisible here.

Bytes: an operator reads each tensor argument and writes each tensor it returns, each as the distinct elements its
view addresses (a dimension of stride 0, a broadcast, counts once) times the element size; an out= argument and the
destination of `copy_` / `fill_` / `zero_` are written, not read. Caches are ignored: this is the traffic of an
eager execution in which every operator reads its inputs from memory and writes its outputs back, the kind of
traffic the paper's Table 1 counts (there per token and layer, in units of `d`).

The comparison (`extra_per_sublayer`): the AttnRes model and `LlamaForCausalLM` hold the same weights (the AttnRes
pseudo-queries random and non-zero) and run the same step: one eager decode step of one token (batch 1, the prompt
in a `DynamicCache`), or one training step (forward and backward of the language-model loss, `batch x seq` tokens).
The difference of their totals is divided by the number of sublayers (two per decoder layer; the final aggregation
is spread over them) and, for bytes, by the number of tokens and by the size of one hidden-size vector in the
model's dtype (`d` in the paper's units).

    python -m tests.launch_budget                       # the issue's setting: Block N = 8, hidden 256, 16 layers
    python -m tests.launch_budget --operators           # and which operators make the difference
    python -m tests.launch_budget --implementation triton --device cuda
"""

import argparse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM

from attnres import AttnResConfig, AttnResForCausalLM
from attnres.modeling_attnres import CACHE_NAME


aten = torch.ops.aten
# Operators that launch no kernel although their schema does not mark them as views (see the module docstring).
NO_KERNEL = {
    aten._unsafe_view.default,
    aten.lift_fresh.default,
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.empty_like.default,
}
# In-place operators that overwrite their destination without reading it.
OVERWRITES = {aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default}


def is_view(func: torch._ops.OpOverload) -> bool:
    """Whether every tensor `func` returns is, by its schema, an alias of an input that it does not write."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def addressed_bytes(tensor: torch.Tensor) -> int:
    """The bytes of the distinct elements a tensor view addresses: a broadcast (stride 0) dimension counts once."""
    if tensor.numel() == 0:
        return 0
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size()


@dataclass
class Counts:
    """Launches and bytes, in total and by operator (`aten.mm`, ...)."""

    launches: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)  # read + written

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


class OperatorCounter(TorchDispatchMode):
    """Counts the kernel-launching operators called inside it and the bytes they read and write (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in NO_KERNEL or is_view(func):
            return result
        schema_arguments = func._schema.arguments
        written_only = {
            argument.name
            for argument in schema_arguments
            if argument.alias_info is not None and argument.alias_info.is_write and argument.kwarg_only
        }
        if func in OVERWRITES:
            written_only.add(schema_arguments[0].name)
        read = [value for index, value in enumerate(args) if schema_arguments[index].name not in written_only]
        read += [value for name, value in kwargs.items() if name not in written_only]
        name = str(func.overloadpacket)
        self.counts.launches[name] += 1
        self.counts.bytes[name] += sum(
            addressed_bytes(leaf) for leaf in tree_leaves((read, result)) if isinstance(leaf, torch.Tensor)
        )
        return result


def count(step: Callable[[], object]) -> Counts:
    """The counts of one call of `step`."""
    with OperatorCounter() as counter:
        step()
    return counter.counts


@dataclass(frozen=True)
class BudgetSetting:
    """The model pair and the steps of the issue's budget: Block AttnRes N = 8 against Llama, hidden 256, 16 layers,
    fp32, one decode step after a prompt, one training step (forward and backward of the loss)."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 16
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    num_blocks: int = 8
    residual_mode: str = "block"
    attn_res_implementation: str = "two_phase"
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    prompt: int = 16  # decode: tokens already in the KV cache
    batch: int = 2  # training step: batch x seq tokens
    seq: int = 32

    @property
    def sublayers(self) -> int:
        return 2 * self.num_hidden_layers


def build_pair(setting: BudgetSetting) -> tuple[LlamaForCausalLM, AttnResForCausalLM]:
    """transformers' Llama and an AttnRes model with the same weights, both with sdpa attention; the AttnRes
    pseudo-queries random and non-zero, so that nothing could take a shortcut on uniform depth weights."""
    common = dict(
        vocab_size=setting.vocab_size,
        hidden_size=setting.hidden_size,
        intermediate_size=setting.intermediate_size,
        num_hidden_layers=setting.num_hidden_layers,
        num_attention_heads=setting.num_attention_heads,
        num_key_value_heads=setting.num_key_value_heads,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    generator = torch.Generator().manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**common))
    attnres = AttnResForCausalLM(
        AttnResConfig(
            **common,
            residual_mode=setting.residual_mode,
            attn_res_num_blocks=setting.num_blocks,
            attn_res_implementation=setting.attn_res_implementation,
        )
    )
    attnres.load_state_dict(llama.state_dict(), strict=False)
    with torch.no_grad():
        for name, param in attnres.attn_res_parameters().items():
            if name.endswith("_proj.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return llama.to(setting.device, setting.dtype), attnres.to(setting.device, setting.dtype)


def count_decode_step(model: torch.nn.Module, setting: BudgetSetting) -> Counts:
    """One eager decode step of one token per sequence (batch 1), with `setting.prompt` tokens in the KV cache; a
    first decode step runs uncounted, so that nothing lazily set up is counted."""
    model.eval()
    ids = torch.randint(3, setting.vocab_size, (1, setting.prompt + 2), generator=torch.Generator().manual_seed(1))
    ids = ids.to(setting.device)
    with torch.no_grad():  # the KV cache under the installed transformers' name (5.24 renamed it)
        cache = getattr(model(ids[:, : setting.prompt], use_cache=True), CACHE_NAME)
        model(ids[:, setting.prompt : setting.prompt + 1], use_cache=True, **{CACHE_NAME: cache})
        return count(lambda: model(ids[:, -1:], use_cache=True, **{CACHE_NAME: cache}))


def count_train_step(model: torch.nn.Module, setting: BudgetSetting) -> Counts:
    """One training step's forward and backward of the language-model loss (no optimizer), gradients starting at
    None; one uncounted step first."""
    model.train()
    ids = torch.randint(
        3, setting.vocab_size, (setting.batch, setting.seq), generator=torch.Generator().manual_seed(2)
    ).to(setting.device)

    def step() -> None:
        model(ids, labels=ids).loss.backward()

    step()
    model.zero_grad(set_to_none=True)
    counts = count(step)
    model.zero_grad(set_to_none=True)
    return counts


@dataclass(frozen=True)
class Extra:
    """What AttnRes adds to Llama's step, per sublayer: operator launches, and bytes per token in d-vectors of the
    model dtype; with both totals, so that ratios can be quoted."""

    launches: float
    bytes_per_token: float
    llama: Counts
    attnres: Counts

    @property
    def launch_ratio(self) -> float:
        return self.attnres.total_launches / self.llama.total_launches

    def operators(self) -> list[tuple[str, int, float]]:
        """(operator, extra launches per step, extra bytes per step) where the two models differ, largest first."""
        names = set(self.llama.launches) | set(self.attnres.launches)
        rows = [
            (
                name,
                self.attnres.launches[name] - self.llama.launches[name],
                self.attnres.bytes[name] - self.llama.bytes[name],
            )
            for name in names
        ]
        return sorted((row for row in rows if row[1] or row[2]), key=lambda row: (-abs(row[1]), -abs(row[2])))


def extra_per_sublayer(llama: Counts, attnres: Counts, setting: BudgetSetting, tokens: int) -> Extra:
    vector_bytes = setting.hidden_size * torch.empty((), dtype=setting.dtype).element_size()
    return Extra(
        launches=(attnres.total_launches - llama.total_launches) / setting.sublayers,
        bytes_per_token=(attnres.total_bytes - llama.total_bytes) / tokens / vector_bytes / setting.sublayers,
        llama=llama,
        attnres=attnres,
    )


def measure(setting: BudgetSetting) -> dict[str, Extra]:
    """The extra cost of AttnRes over Llama per sublayer, for one decode step and one training step."""
    llama, attnres = build_pair(setting)
    decode = extra_per_sublayer(count_decode_step(llama, setting), count_decode_step(attnres, setting), setting, 1)
    train = extra_per_sublayer(
        count_train_step(llama, setting), count_train_step(attnres, setting), setting, setting.batch * setting.seq
    )
    return {"decode": decode, "train": train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--residual-mode", default="block", choices=["block", "full"])
    parser.add_argument("--implementation", default="two_phase", help="attn_res_implementation")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--operators", action="store_true", help="list the operators that make the difference")
    args = parser.parse_args()
    setting = BudgetSetting(
        residual_mode=args.residual_mode,
        attn_res_implementation=args.implementation,
        device=args.device,
        dtype=getattr(torch, args.dtype),
    )
    print(
        f"{setting.residual_mode} AttnRes ({setting.attn_res_implementation}), N = {setting.num_blocks}, hidden "
        f"{setting.hidden_size}, {setting.num_hidden_layers} layers, {setting.dtype}, vs transformers' Llama"
    )
    for step, extra in measure(setting).items():
        print(
            f"{step}: +{extra.launches:.1f} launches per sublayer ({extra.attnres.total_launches} vs "
            f"{extra.llama.total_launches}: {extra.launch_ratio:.2f}x), +{extra.bytes_per_token:.1f} d-vectors per "
            f"token per sublayer"
        )
        if args.operators:
            for name, launches, moved in extra.operators():
                print(f"    {name:40s} {launches:+6d} launches {moved / 2**20:+10.3f} MiB")


if __name__ == "__main__":
    main()
