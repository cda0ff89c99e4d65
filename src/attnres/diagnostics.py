# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""What AttnRes does inside a model, measured on text: the paper's evidence (its Fig. 5 and depth-attention maps).

- **Depth-attention map**: for every sublayer (rows) and the output, the softmax weight it puts on each source
  (columns: the embedding, then each block, or each sublayer in Full mode), averaged over tokens.
- **Output magnitude per layer**: the RMS of the hidden state each decoder layer reads (PreNorm: the residual stream,
  which grows with depth; AttnRes: the aggregated input, a convex combination of the sources) and of the final state.
- **Gradient magnitude per layer**: the L2 norm of the LM loss gradient over each decoder layer's weights (its
  AttnRes parameters excluded, so that AttnRes and standard models are compared on the same weights).
- **Training-step memory**: the bytes a training step holds for its backward pass and its peak (`step_memory`),
  the measure of the paper's O(N·d) claim for Block AttnRes.

The same measurements work for any transformers causal LM whose decoder layers form one list (Llama, Mistral, Qwen,
GPT-2, AttnRes: `decoder_layers`), so a standard model can be shown side by side with its AttnRes counterpart.
"""

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import AttnResError
from .layout import source_names
from .model_sources import ModelSource, has_tokenizer_files
from .peft_support import is_attn_res_parameter


@dataclass
class Diagnostics:
    label: str
    layer_input_rms: list[float]  # one per decoder layer, then the final (pre-norm) output
    layer_grad_norm: list[float]  # one per decoder layer
    loss: float
    tokens: int
    depth_attention: list[list[float]] | None = None  # rows: sublayers + output; columns: sources (NaN if unseen)
    source_names: list[str] = field(default_factory=list)
    row_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def collect(model, input_ids: torch.Tensor, label: str) -> Diagnostics:
    """Run one forward and backward pass of `model` on `input_ids` (batch, seq) and measure everything above.

    The model's parameters get gradients (then cleared); nothing is updated."""
    model.eval()
    model.zero_grad(set_to_none=True)
    is_attnres = getattr(model.config, "model_type", None) == "attnres"
    layers = decoder_layers(model)
    with recorded_layer_inputs(model, layers) as layer_inputs:
        outputs = (
            model(input_ids, labels=input_ids, output_depth_attentions=True)
            if is_attnres
            else model(input_ids, labels=input_ids)
        )
        outputs.loss.backward()
    rms = [float(h.float().pow(2).mean().sqrt()) for h in layer_inputs]
    grad_norms = []
    for layer in layers:  # its own weights; AttnRes parameters left out, so models compare like for like
        grads = [
            p.grad for name, p in layer.named_parameters() if p.grad is not None and not is_attn_res_parameter(name)
        ]
        grad_norms.append(math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads)))
    model.zero_grad(set_to_none=True)
    result = Diagnostics(label, rms, grad_norms, float(outputs.loss.detach()), int(input_ids.numel()))
    if is_attnres:
        result.source_names = source_names(model.config)
        sublayers = 2 * model.config.num_hidden_layers
        result.row_names = [f"{i // 2}.{'mlp' if i % 2 else 'attn'}" for i in range(sublayers)] + ["output"]
        result.depth_attention = []
        for weights in outputs.depth_attentions:
            mean = weights.detach().float().mean(dim=(0, 1)).tolist()
            result.depth_attention.append(mean + [math.nan] * (len(result.source_names) - len(mean)))
    return result


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM, found without knowing its family: the first `ModuleList` of
    `config.num_hidden_layers` modules (Llama's and AttnRes' `model.layers`, GPT-2's `transformer.h`, OPT's
    `model.decoder.layers`), rather than one family's attribute names."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise AttnResError(
        f"{type(model).__name__}: no list of config.num_hidden_layers ({count}) decoder layers found; the diagnostics "
        "measure models whose decoder layers form one list (Llama, Mistral, Qwen, GPT-2, AttnRes)"
    )


@contextmanager
def recorded_layer_inputs(model, layers: torch.nn.ModuleList):
    """Collects, in order, the hidden state each of `layers` reads and the one the final norm reads: for AttnRes the
    outputs of its `attention_input` and output aggregations, for a standard model (Llama, Mistral, Qwen, GPT-2) the
    residual stream each layer is called with and the last layer's output, which is what the final norm reads.
    Forward hooks, removed on exit."""
    inputs: list[torch.Tensor] = []

    def keep_output(_module, _args, output):
        inputs.append((output[0] if isinstance(output, tuple) else output).detach())

    def keep_input(_module, args, kwargs, _output):
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach())

    if getattr(model.config, "model_type", None) == "attnres":
        hooks = [layer.attention_input.register_forward_hook(keep_output) for layer in layers]
        hooks.append(model.model.norm.register_forward_hook(keep_input, with_kwargs=True))
    else:
        hooks = [layer.register_forward_hook(keep_input, with_kwargs=True) for layer in layers]
        hooks.append(layers[-1].register_forward_hook(keep_output))
    try:
        yield inputs
    finally:
        for hook in hooks:
            hook.remove()


def step_memory(model, input_ids: torch.Tensor) -> tuple[int, int]:
    """`(held, peak)` bytes of one training step (LM loss on `input_ids`, forward and backward): what the forward
    pass allocated and still holds when the backward starts (the activation memory, including buffers that
    autograd's saved-tensor hooks do not see), and the peak above the starting point over the whole step.

    Read from the profiler's per-operation allocation records, so it works on the CPU, which keeps no allocator
    statistics (on a GPU, `torch.cuda.max_memory_allocated` is the direct measure). A temporary that one operation
    allocates and frees itself is not seen."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
        loss = model(input_ids, labels=input_ids).loss
        with torch.profiler.record_function("backward"):
            loss.backward()
    events = profile.events()
    backward_start = next(event.time_range.start for event in events if event.name == "backward")
    allocations = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage)
    current = peak = held = 0
    for start, size in allocations:
        current += size
        peak = max(peak, current)
        if start < backward_start:
            held = current
    return held, peak


def plot_depth_attention(diagnostics: Diagnostics, path: Path) -> None:
    """Heatmap of the token-averaged depth-attention weights (rows: sublayers then output; columns: sources)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    weights = np.array(diagnostics.depth_attention, dtype=float)
    rows, columns = weights.shape
    figure, axis = plt.subplots(figsize=(2.5 + 0.45 * columns, 1.5 + 0.22 * rows), layout="constrained")
    image = axis.imshow(np.ma.masked_invalid(weights), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    axis.set_xticks(range(columns), [_short(name) for name in diagnostics.source_names], rotation=60, ha="right",
                    fontsize=7)  # fmt: skip
    axis.set_yticks(range(rows), diagnostics.row_names, fontsize=6)
    axis.set_xlabel("source")
    axis.set_ylabel("sublayer (layer.kind)")
    axis.set_title(f"depth attention, {diagnostics.label}", fontsize=9)
    figure.colorbar(image, ax=axis, label="weight (mean over tokens)")
    figure.savefig(path, dpi=150, metadata={"Description": json.dumps(diagnostics.depth_attention)})
    plt.close(figure)


def plot_magnitudes(runs: list[Diagnostics], path: Path) -> None:
    """Per-layer hidden-state RMS and gradient norm of several models side by side (the paper's Fig. 5 b/c)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for run in runs:
        left.plot(range(len(run.layer_input_rms)), run.layer_input_rms, marker="o", markersize=3, label=run.label)
        right.plot(range(len(run.layer_grad_norm)), run.layer_grad_norm, marker="o", markersize=3, label=run.label)
    left.set_xlabel("decoder layer (last point: final output)")
    left.set_ylabel("RMS of the layer's input")
    left.set_yscale("log")
    right.set_xlabel("decoder layer")
    right.set_ylabel("‖∇ loss‖ over the layer's parameters")
    right.set_yscale("log")
    left.legend(fontsize=8)
    plotted = {run.label: {"rms": run.layer_input_rms, "grad": run.layer_grad_norm} for run in runs}
    figure.savefig(path, dpi=150, metadata={"Description": json.dumps(plotted)})
    plt.close(figure)


def format_diagnostics(runs: list[Diagnostics]) -> str:
    """A markdown table: per layer, each model's input RMS and gradient norm, then the final output's RMS. Models of
    different depths (a GPT-2 baseline) show "–" below their last layer."""
    header = "| layer | " + " | ".join(f"{r.label} RMS | {r.label} grad" for r in runs) + " |"
    lines = [header, "|---:|" + "---:|---:|" * len(runs)]
    for layer in range(max(len(run.layer_grad_norm) for run in runs)):
        cells = []
        for run in runs:
            if layer < len(run.layer_grad_norm):
                cells += [f"{run.layer_input_rms[layer]:.4g}", f"{run.layer_grad_norm[layer]:.3g}"]
            else:
                cells += ["–", "–"]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines.append("| output | " + " | ".join(f"{run.layer_input_rms[-1]:.4g} | –" for run in runs) + " |")
    return "\n".join(lines)


def _short(name: str) -> str:
    return name.split(":")[0] if name.startswith("block") else name


def check_baseline_tokens(
    baseline: ModelSource, text: str, input_ids: torch.Tensor, *, trust_remote_code: bool
) -> None:
    """Both models are measured on the model's tokens (`input_ids`, of `text`), so the baseline must read them as the
    same text: its own tokenizer, where it has tokenizer files here, must give the same ids, and its vocabulary must
    hold every id (otherwise the embedding lookup fails inside torch, after both models have loaded)."""
    from transformers import AutoConfig, AutoTokenizer

    fix = "give a baseline with the model's tokenizer (e.g. the checkpoint it was grafted from)"
    if baseline.directory is not None and has_tokenizer_files(baseline.directory):
        theirs = AutoTokenizer.from_pretrained(baseline.directory, trust_remote_code=trust_remote_code)
        if theirs(text).input_ids[: input_ids.shape[1]] != input_ids[0].tolist():
            raise AttnResError(f"--baseline {baseline.name!r} tokenizes --text differently from the model; {fix}")
    config = AutoConfig.from_pretrained(**baseline.from_pretrained_kwargs(), trust_remote_code=trust_remote_code)
    vocabulary = config.get_text_config().vocab_size
    if int(input_ids.max()) >= vocabulary:
        raise AttnResError(
            f"--baseline {baseline.name!r} embeds {vocabulary} tokens, but the model's tokenizer gives --text token "
            f"ids up to {int(input_ids.max())}; {fix}"
        )


def diagnose(
    model: str,
    text_file: Path,
    output: Path,
    *,
    baseline: str | None = None,
    max_tokens: int = 512,
    trust_remote_code: bool = False,
) -> str:
    """`attnres inspect --text`: measure `model` (and `baseline`) on the first `max_tokens` tokens of `text_file` and
    write depth_attention.png, magnitudes.png, diagnostics.md and diagnostics.json into `output`; returns the table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model_sources import check_available, check_model_code, check_tokenizer, loading_options, locate_model
    from .paths import check_replaceable, staged_directory

    if max_tokens < 1:
        raise AttnResError(f"--max-tokens must be a positive number of tokens, got {max_tokens}")
    if not text_file.is_file():
        raise AttnResError(f"--text {text_file} is not a file")
    check_replaceable(output.absolute(), force=False, flag="--output", force_flag=None)
    sources = {"AttnRes": locate_model(model, flag="model")}
    if baseline is not None:
        sources["baseline"] = locate_model(baseline, flag="--baseline")
    for flag, source in zip(("model", "--baseline"), sources.values()):
        check_available(source, flag=flag)
        check_model_code(source, flag=flag, trust_remote_code=trust_remote_code)
    check_tokenizer(
        sources["AttnRes"], flag="model", fix="--text is tokenized with the model's tokenizer: save the one it was "
        "made with into it (`attnres convert` copies its source's)"
    )  # fmt: skip
    loading = loading_options(trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(
        **sources["AttnRes"].from_pretrained_kwargs(), trust_remote_code=trust_remote_code
    )
    text = text_file.read_text(errors="replace")
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    if input_ids.shape[1] < 2:
        raise AttnResError(f"--text {text_file} has {input_ids.shape[1]} token(s); the measurement needs at least two")
    if baseline is not None:
        check_baseline_tokens(sources["baseline"], text, input_ids, trust_remote_code=trust_remote_code)
    runs = []
    for label, source in sources.items():
        loaded = AutoModelForCausalLM.from_pretrained(
            **source.from_pretrained_kwargs(), dtype=torch.float32, **loading
        )
        runs.append(collect(loaded, input_ids, f"{label}: {Path(source.name).name}"))
        del loaded
    table = format_diagnostics(runs)
    losses = ", ".join(f"{run.label} {run.loss:.4f}" for run in runs)
    with staged_directory(output, flag="--output", force_flag=None) as staging:
        plot_depth_attention(runs[0], staging / "depth_attention.png")
        plot_magnitudes(runs, staging / "magnitudes.png")
        (staging / "diagnostics.md").write_text(
            f"{input_ids.shape[1]} tokens of {text_file.name}; loss: {losses}\n\n{table}\n"
        )
        (staging / "diagnostics.json").write_text(json.dumps([run.to_dict() for run in runs], indent=2) + "\n")
    return table
