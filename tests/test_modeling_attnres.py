"""Numerics of AttnResForCausalLM against independent references: transformers' own models (their blocks, and the
whole network at zero queries), the paper-literal loop of reference_attnres.py, the naive implementation against
the two-phase one, and itself (cache, padding, checkpointing)."""

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from attnres import AttnResConfig, AttnResForCausalLM
from attnres.diagnostics import step_memory
from attnres.layout import depth_source_names
from attnres.modeling_attnres import AttnResKeyNorm, AttnResPseudoQuery, AttnResRMSNorm, OffloadedLayerInputs
from tests.conftest import TOLERANCES, assert_close, requires_fullgraph_compile
from tests.reference_attnres import reference_logits
from tests.tiny_models import FAMILIES, attnres_parameter_names, family_pair, randomize_, tiny_config


SEQ = 12  # longer than the sliding window (4) of the Mistral/Qwen2 twins, so the window matters


def random_ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 99, (batch, seq), generator=torch.Generator().manual_seed(seed))


def attnres_model(residual_mode: str = "block", query_std: float | None = None, **overrides) -> AttnResForCausalLM:
    return randomize_(AttnResForCausalLM(tiny_config(residual_mode, **overrides)), query_std=query_std).eval()


# --- the Llama-family blocks are transformers' -----------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sublayers_compute_what_transformers_blocks_compute(family):
    """The attention (with Qwen2's bias, Qwen3's QK-norm, sliding windows, Llama-3 RoPE), MLP, RMSNorm and rotary
    embedding are copies of transformers' own: bit-identical outputs from the same weights and inputs."""
    reference, model = family_pair(family)
    theirs, ours = reference.model, model.model
    hidden = torch.randn(2, SEQ, 32)
    position_ids = torch.arange(SEQ)[None].expand(2, -1)
    position_embeddings = theirs.rotary_emb(hidden, position_ids)
    for ours_part, theirs_part in zip(ours.rotary_emb(hidden, position_ids), position_embeddings):
        assert_close(ours_part, theirs_part, "exact", f"{family} rotary embedding")
    for layer, (our_layer, their_layer) in enumerate(zip(ours.layers, theirs.layers)):
        attention = dict(position_embeddings=position_embeddings, attention_mask=None)
        assert_close(our_layer.self_attn(hidden, **attention)[0], their_layer.self_attn(hidden, **attention)[0],
                     "exact", f"{family} layer {layer} attention")  # fmt: skip
        assert_close(our_layer.mlp(hidden), their_layer.mlp(hidden), "exact", f"{family} layer {layer} MLP")
    norm = AttnResRMSNorm(32, eps=theirs.norm.variance_epsilon)
    norm.load_state_dict(theirs.norm.state_dict())
    assert_close(norm(hidden), theirs.norm(hidden), "exact", f"{family} RMSNorm")


# --- zero pseudo-queries reproduce the PreNorm network ---------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode, overrides", [("block", {}), ("block", {"attn_res_block_size": 1}), ("full", {})])
def test_zero_queries_equal_standard(family, mode, overrides):
    reference, model = family_pair(family, mode, **overrides)
    ids = random_ids()
    labels = random_ids(seed=1)
    expected, actual = reference(ids, labels=labels), model(ids, labels=labels)
    assert_close(actual.logits, expected.logits, "fp32", f"zero-query {mode}{overrides} vs {family}")
    assert_close(actual.loss, expected.loss, "fp32", f"zero-query {mode}{overrides} vs {family} loss")


def test_zero_query_layer_inputs_are_the_stream_over_the_source_count():
    """The claim behind the exact graft: a zero-query aggregation over n sources is the residual stream / n. The
    input each layer's attention reads is its `attention_input` module's output; Llama's is its hidden state."""
    reference, model = family_pair("llama", "block")
    ids = random_ids()
    theirs = reference(ids, output_hidden_states=True).hidden_states
    ours = []
    handles = [layer.attention_input.register_forward_hook(lambda _m, _a, out: ours.append(out[0]))
               for layer in model.model.layers]  # fmt: skip
    model(ids)
    for handle in handles:
        handle.remove()
    for layer_idx, layer_input in enumerate(ours):
        count = model.config.num_depth_sources(2 * layer_idx)
        assert_close(layer_input * count, theirs[layer_idx], "fp32", f"layer {layer_idx} input x {count}")


def test_eps_rescaling_is_what_makes_zero_queries_exact():
    """Negative control: with the PreNorm eps left at ε instead of ε / n², the zero-query model drifts from the
    PreNorm network beyond the fp32 tolerance and far beyond the rounding-level difference of the rescaled model."""
    reference, model = family_pair("llama", "block")
    ids = random_ids()
    expected = reference(ids).logits
    exact = (model(ids).logits - expected).abs().max().item()
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = model.config.rms_norm_eps
    drift = (model(ids).logits - expected).abs().max().item()
    print(f"[max-abs-diff] zero-query block vs llama: {exact:.3g} with eps/n², {drift:.3g} with eps")
    assert drift > 10 * exact and drift > 1e-5


# --- block and full modes equal the paper-literal loop ---------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, overrides",
    [
        ("block", {"attn_res_block_size": 1}),
        ("block", {"attn_res_block_size": 2}),  # last block shorter (5 layers)
        ("block", {"attn_res_block_size": 3}),
        ("block", {"attn_res_block_size": 5}),  # N = 1
        ("block", {"attn_res_num_blocks": 8, "num_hidden_layers": 8}),
        ("full", {}),
    ],
)
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
@pytest.mark.parametrize("implementation", ["two_phase", "naive"])
def test_model_equals_paper_literal_loop(mode, overrides, grad, implementation):
    """With autograd the sources go through the custom autograd functions; without, they are plain buffer writes."""
    model = attnres_model(mode, query_std=0.3, attn_implementation="eager", attn_res_implementation=implementation,
                          **overrides)  # fmt: skip
    ids = random_ids()
    with torch.no_grad():
        expected_logits, expected_weights, expected_layer_outputs = reference_logits(model, ids)
    with torch.set_grad_enabled(grad):
        output = model(ids, output_depth_attentions=True, output_hidden_states=True)
    what = f"{implementation} {mode}{overrides}"
    assert_close(output.logits, expected_logits, "fp32_reference", f"{what} vs the paper-literal loop")
    assert len(output.depth_attentions) == len(expected_weights) == 2 * model.config.num_hidden_layers + 1
    for ours, theirs in zip(output.depth_attentions, expected_weights):
        assert_close(ours, theirs, "fp32", f"{what} depth weights")
    # hidden states: the embedding, each layer's running sum, the final normalised output
    assert len(output.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(output.hidden_states[0], model.model.embed_tokens(ids))
    for layer, (ours, theirs) in enumerate(zip(output.hidden_states[1:-1], expected_layer_outputs)):
        assert_close(ours, theirs, "fp32_reference", f"{what} layer {layer} output")
    # The weights are not trivially uniform: random queries make them input dependent.
    assert max(w.std().item() for w in output.depth_attentions if w.shape[-1] > 1) > 0.05


@pytest.mark.parametrize(
    "mode, overrides",
    [
        ("block", {"attn_res_block_size": 2}),
        ("block", {"attn_res_block_size": 5}),
        ("block", {"attn_res_num_blocks": 8, "num_hidden_layers": 8}),
        ("full", {}),
    ],
)
@pytest.mark.parametrize("implementation", ["two_phase", "naive"])
def test_gradients_equal_paper_literal_loop(mode, overrides, implementation):
    """The hand-written backward of phase 1 and of the commits (`DepthAttentionFunction`, `CommitSourceFunction`)
    against autograd through the paper-literal loop: every parameter's gradient, for a loss that reaches the
    aggregations through the logits and through the reported depth weights (phase 1's `probabilities` output)."""
    model = attnres_model(mode, query_std=0.3, attn_implementation="eager", attn_res_implementation=implementation,
                          **overrides)  # fmt: skip
    ids = random_ids()

    def loss_of(logits, weights):  # fixed random projections of everything the model reports
        generator = torch.Generator().manual_seed(3)
        return (logits * torch.randn(logits.shape, generator=generator)).sum() + sum(
            (w * torch.randn(w.shape, generator=generator)).sum() for w in weights
        )

    loss_of(*reference_logits(model, ids)[:2]).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    output = model(ids, output_depth_attentions=True)
    loss_of(output.logits, output.depth_attentions).backward()
    ours = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == expected.keys()
    # Gradients here reach |g| ~ 60 through up to 21 aggregations, so elementwise fp32 tolerances would flag rounding
    # in cancelling entries; the relative error of each parameter's gradient is the meaningful measure (observed
    # ≤ 1e-5; a wrong term in the backward gives O(1)).
    errors = {
        name: ((ours[name] - grad).norm() / grad.norm().clamp_min(1e-12)).item() for name, grad in expected.items()
    }
    worst = max(errors, key=errors.get)
    print(f"[relative-error] {implementation} {mode}{overrides} gradients vs the loop: {errors[worst]:.2g} ({worst})")
    assert errors[worst] < TOLERANCES["fp32_grad_relative"], worst
    query_grads = [g.abs().max().item() for n, g in ours.items() if "res_proj" in n]
    assert max(query_grads) > 1e-3  # the comparison covers live pseudo-query gradients


@pytest.mark.parametrize("mode", ["block", "full"])
def test_depth_attentions_are_uniform_at_init_and_sum_to_one(mode):
    model = AttnResForCausalLM(tiny_config(mode)).eval()
    weights = model(random_ids(), output_depth_attentions=True).depth_attentions
    names = depth_source_names(model.config)
    assert len(weights) == len(names) == 2 * model.config.num_hidden_layers + 1
    for sublayer, (sources, w) in enumerate(zip(names, weights)):
        assert len(sources) == model.config.num_depth_sources(sublayer)
        assert w.dtype == torch.float32 and w.shape == (2, SEQ, len(sources))
        assert_close(w, torch.full_like(w, 1 / len(sources)), "fp32", "zero-init depth weights")
    assert model(random_ids()).depth_attentions is None  # only when asked for


@pytest.mark.parametrize("mode", ["block", "full"])
@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
@torch.no_grad()  # flex attention has no CPU backward
def test_attention_implementations_agree(mode, implementation):
    model = attnres_model(mode, query_std=0.3)
    ids = random_ids()
    model.set_attn_implementation("eager")
    eager = model(ids).logits
    model.set_attn_implementation(implementation)
    assert_close(model(ids).logits, eager, "fp32_regrouped", f"{mode} {implementation} vs eager")


# --- cache, generation, padding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2-sliding"])
@pytest.mark.parametrize("mode", ["block", "full"])
def test_incremental_decoding_equals_full_forward(family, mode):
    _, model = family_pair(family, mode)
    randomize_(model, query_std=0.3)
    ids = random_ids(seq=SEQ + 4)
    full = model(ids).logits
    prompt = 5
    output = model(ids[:, :prompt], use_cache=True)
    steps = [output.logits]
    for position in range(prompt, ids.shape[1]):
        output = model(ids[:, position : position + 1], past_key_values=output.past_key_values, use_cache=True)
        steps.append(output.logits)
    assert_close(torch.cat(steps, dim=1), full, "fp32_cache", f"{mode} {family} cached decoding vs full forward")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["block", "full"])
def test_generate_with_cache_equals_without_and_the_source_model(family, mode):
    """`generate` decodes through the KV cache under whatever name the installed transformers passes it (`cache` from
    5.24, `past_key_values` before): a cache that is silently dropped makes every token after the first depend on that
    token alone, which the no-cache run and the source model expose. Zero queries: the same tokens as the source;
    random queries: cached and uncached decoding still agree."""
    reference, model = family_pair(family, mode)
    prompt = random_ids(batch=2, seq=SEQ)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = reference.generate(prompt, **kwargs)
    assert expected.shape == (2, SEQ + 10)
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs), expected)
    assert torch.equal(model.generate(prompt, use_cache=False, **kwargs), expected)
    randomize_(model, query_std=0.3)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    assert not torch.equal(cached, expected)  # the queries matter, so the agreement below is not the source's
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))


def test_both_names_of_the_kv_cache_work_in_both_directions():
    """transformers 5.24 renamed `past_key_values` to `cache`; the model takes either argument and its outputs answer
    to either field name, on every supported release."""
    model = attnres_model("block", query_std=0.3)
    ids = random_ids(seq=SEQ + 1)
    full = model(ids).logits[:, -1]
    for name in ("cache", "past_key_values"):
        with torch.no_grad():
            first = model(ids[:, :-1], use_cache=True)
            assert first.cache is not None and first.cache is first.past_key_values
            step = model(ids[:, -1:], use_cache=True, **{name: first.cache})
        assert_close(step.logits[:, -1], full, "fp32_cache", f"next token with the cache passed as {name}")
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, -1:], cache=first.cache, past_key_values=first.cache)


def test_static_cache_generation_matches_the_dynamic_cache():
    model = attnres_model("block", query_std=0.3)
    prompt = random_ids(batch=1, seq=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(
        model.generate(prompt, cache_implementation="static", **kwargs), model.generate(prompt, **kwargs)
    )


@requires_fullgraph_compile
def test_static_cache_generation_compiles_and_matches_the_dynamic_cache():
    """transformers' compiled decoding: `generate(cache_implementation="static")` compiles the decode step. It does so
    on accelerators only, so the compiled run opts the CPU in the way transformers' own tests do, with fullgraph=True
    so that any graph break fails the test."""
    from transformers import CompileConfig

    model = attnres_model("block", query_std=0.3)
    prompt = random_ids(batch=1, seq=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kwargs)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True
    compiled = model.generate(prompt, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert hasattr(model, "_compiled_call"), "generate did not compile the decode step"
    assert torch.equal(compiled, expected)


@pytest.mark.parametrize("mode", ["block", "full"])
def test_left_padded_batch_equals_unpadded_sequences(mode):
    model = attnres_model(mode, query_std=0.3)
    lengths = [9, 5]
    sequences = [random_ids(batch=1, seq=n, seed=n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for row, seq in enumerate(sequences):
        single = model(seq[None]).logits[0]
        assert_close(padded[row, width - len(seq) :], single, "fp32", f"{mode} left-padded row {row}")

    generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, seq in enumerate(sequences):
        single = model.generate(seq[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(generated[row, width:], single[0, len(seq) :]), f"row {row}"


# --- training: gradients, checkpointing ------------------------------------------------------------------------------


def _gradients(model: AttnResForCausalLM, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def enable_deprecated_name(model: AttnResForCausalLM, use_reentrant: bool) -> None:
    """The name every supported release knows, deprecated from transformers 5.23 on (FutureWarning there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


# How activation checkpointing is switched on: `activation_checkpointing_enable` is transformers 5.23's name and
# options, which AttnRes models have on every supported release.
CHECKPOINTING = {
    "gradient_checkpointing_enable": enable_deprecated_name,
    "every layer": lambda model, reentrant: model.activation_checkpointing_enable({"use_reentrant": reentrant}),
    "every 2nd layer": lambda model, reentrant: model.activation_checkpointing_enable(
        {"use_reentrant": reentrant}, every_n_layers=2
    ),
    "offload": lambda model, reentrant: model.activation_checkpointing_enable(
        {"use_reentrant": reentrant}, offload=True
    ),
    "every 2nd layer, offload": lambda model, reentrant: model.activation_checkpointing_enable(
        {"use_reentrant": reentrant}, every_n_layers=2, offload=True
    ),
}


@pytest.mark.parametrize("mode", ["block", "full"])
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("checkpointing", list(CHECKPOINTING))
def test_activation_checkpointing_gives_the_same_gradients(mode, use_reentrant, checkpointing):
    model = attnres_model(mode, query_std=0.3).train()
    ids = random_ids()
    expected = _gradients(model, ids)
    CHECKPOINTING[checkpointing](model, use_reentrant)
    recomputed = [layer.gradient_checkpointing for layer in model.model.layers]
    assert recomputed == [index % (2 if "2nd" in checkpointing else 1) == 0 for index in range(5)]
    assert model.model.offloads_checkpointed_inputs is ("offload" in checkpointing)
    attention_calls = [0] * len(recomputed)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(
            lambda *_, index=index: attention_calls.__setitem__(index, attention_calls[index] + 1)
        )
    actual = _gradients(model, ids)
    assert attention_calls == [2 if checkpointed else 1 for checkpointed in recomputed], "recomputed layers"
    assert expected.keys() == actual.keys()
    for name in expected:
        assert (expected[name] is None) == (actual[name] is None), name
        if expected[name] is not None:
            assert_close(actual[name], expected[name], "fp32_grad", f"{mode} {checkpointing} grad {name}")
    model.activation_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)


def test_activation_checkpointing_refuses_a_meaningless_layer_stride():
    with pytest.raises(ValueError, match="every_n_layers must be a positive integer, got 0"):
        attnres_model().activation_checkpointing_enable(every_n_layers=0)


def test_offloading_keeps_the_shared_source_buffers_and_offloads_the_rest():
    """What a checkpointed layer saves for its recompute goes through torch's `save_on_cpu`, except views of the
    completed-source buffers, which every layer receives: those are kept by reference (one buffer, O(N·d)), never
    copied per layer (O(L·N·d))."""
    sources, sources_inv_rms = torch.randn(9, 2, 3, 8), torch.rand(9, 2, 3)
    hooks = OffloadedLayerInputs(sources, sources_inv_rms)
    for view in (sources[:4], sources_inv_rms[:4], sources):
        assert hooks.pack_hook(view) is view and hooks.unpack_hook(view) is view
    hidden_states = torch.randn(2, 3, 8)
    packed = hooks.pack_hook(hidden_states)
    assert isinstance(packed, tuple), "not handed to save_on_cpu"
    assert torch.equal(hooks.unpack_hook(packed), hidden_states)


@pytest.mark.parametrize(
    "checkpointing",
    [None, dict(), dict(offload=True)],
    ids=["no checkpointing", "checkpointing", "checkpointing with offload"],
)
def test_block_activation_memory_grows_linearly_with_the_number_of_blocks(checkpointing):
    """Block AttnRes needs O(N·d) activation memory per token for its sources (paper §4): each completed block is
    kept once, however many later blocks read it, with activation checkpointing (which saves every layer's inputs,
    the source buffers among them) as without. Keeping a stacked copy per block instead costs Σ_k k = O(N²)
    d-vectors. On 16 layers, going from N = 8 to N = 16 blocks may then add at most the 8 new sources; a stack per
    block would add Σ_{9..16} k = 100, and the naive implementation's stack per aggregation adds about 170 (the
    negative control below).

    Other terms move with N too, so the test bounds the growth rather than asserting it: a block start reads a view
    of phase 1's output where a merge writes a new input that the PreNorm keeps, one d-vector less per block.
    Without checkpointing that saving and the new sources cancel (measured: no growth at all)."""
    added = sources_held_by_eight_more_blocks(checkpointing, "two_phase")
    assert added <= 1.25 * 8


def test_the_naive_implementation_holds_more_than_linear_memory():
    """Negative control of the test above: the measurement sees a stack per aggregation."""
    assert sources_held_by_eight_more_blocks(None, "naive") > 2 * 8


def sources_held_by_eight_more_blocks(checkpointing: dict | None, implementation: str) -> float:
    """The activation memory that Block AttnRes on 16 layers holds for its backward with N = 16 blocks beyond N = 8,
    in units of one fp32 source and its 1 / rms."""
    ids = random_ids()
    held = {}
    for num_blocks in (8, 16):
        model = attnres_model("block", query_std=0.3, num_hidden_layers=16, attn_res_num_blocks=num_blocks,
                              attn_res_implementation=implementation).train()  # fmt: skip
        if checkpointing is not None:
            model.activation_checkpointing_enable(**checkpointing)
        measured = []
        for _ in range(3):  # the least of three: lazily created state and stray allocations are not activations
            model.zero_grad(set_to_none=True)
            measured.append(step_memory(model, ids)[0])
        held[num_blocks] = min(measured)
    added = (held[16] - held[8]) / (ids.numel() * (model.config.hidden_size + 1) * 4)
    print(f"[memory] {implementation} {checkpointing}: held bytes for N = 8, 16: {held}; 8 more blocks: {added:.2f}")
    return added


@pytest.mark.parametrize("mode", ["block", "full"])
def test_pseudo_queries_receive_gradients_from_zero_init(mode):
    model = randomize_(AttnResForCausalLM(tiny_config(mode))).train()  # queries stay at their zero init
    grads = _gradients(model, random_ids())
    queries = {name: grad for name, grad in grads.items() if name.endswith("_res_proj.weight")}
    # Layer 0's attention reads a single source (the embedding): its weight is exactly 1 and its query gets no
    # gradient (exactly zero), by construction (as in Kimi K3). Every other query learns from step 0.
    first = queries.pop("model.layers.0.self_attention_res_proj.weight")
    assert first is None or torch.equal(first, torch.zeros_like(first))
    assert all(grad is not None and grad.abs().max() > 0 for grad in queries.values()), queries.keys()
    # With w = 0 the logits w·(γ ⊙ k̂) do not depend on the key-norm weight γ yet: zero gradient, as expected.
    key_norms = [grad for name, grad in grads.items() if name.endswith("_res_norm.weight") and grad is not None]
    assert key_norms and all(grad.abs().max() == 0 for grad in key_norms)


@requires_fullgraph_compile
def test_torch_compile_fullgraph_matches_eager():
    """The AttnRes path compiles without graph breaks (fullgraph=True raises on any), in inference (which writes the
    preallocated source buffer in place) and in training (autograd through the batched phase 1 and the merge)."""
    model = attnres_model("block", query_std=0.3)
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)
        # fp32_regrouped: Inductor fuses and regroups the eager operators' sums (observed 1.3e-5)
        assert_close(compiled(ids).logits, expected, "fp32_regrouped", "compiled inference")
    model.train()
    expected_grads = _gradients(model, ids)
    compiled_grads = _gradients(torch.compile(model, fullgraph=True), ids)
    compiled_grads = {name.removeprefix("_orig_mod."): grad for name, grad in compiled_grads.items()}
    for name, grad in expected_grads.items():
        if grad is not None:
            assert_close(compiled_grads[name], grad, "fp32_grad", f"compiled grad {name}")


# --- dtype, embeddings, loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_keeps_depth_softmax_in_fp32(dtype):
    model = attnres_model("block", query_std=0.3)
    ids = random_ids()
    expected = model(ids).logits
    model = model.to(dtype)
    output = model(ids, output_depth_attentions=True)
    assert output.logits.dtype == dtype
    assert all(w.dtype == torch.float32 for w in output.depth_attentions)
    for w in output.depth_attentions:
        assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), "fp32", f"{dtype} depth weights sum")
    relative_error = ((output.logits.float() - expected).norm() / expected.norm()).item()
    print(f"[relative-error] {dtype} vs fp32 logits: {relative_error:.3g}")
    assert relative_error < TOLERANCES["half_relative"]


def test_tied_embeddings_and_resize():
    model = AttnResForCausalLM(tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.resize_token_embeddings(120)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model(random_ids()).logits.shape == (2, SEQ, 120)
    untied = AttnResForCausalLM(tiny_config())
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_output_attentions_and_tuple_outputs():
    model = attnres_model("block", attn_implementation="eager")
    output = model(random_ids(), output_attentions=True)
    assert len(output.attentions) == 5 and output.attentions[0].shape == (2, 4, SEQ, SEQ)
    as_tuple = model(random_ids(), return_dict=False)
    assert torch.equal(as_tuple[0], output.logits)


def test_save_and_load_round_trip_is_bit_exact(tmp_path):
    model = attnres_model("block", query_std=0.3)
    ids = random_ids()
    model.save_pretrained(tmp_path)
    reloaded = AttnResForCausalLM.from_pretrained(tmp_path).eval()
    for (name, expected), (_, actual) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(expected, actual), name
    assert_close(reloaded(ids).logits, model(ids).logits, "exact", "save/load logits")
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is AttnResForCausalLM  # `import attnres` registers


def test_prenorm_checkpoint_loads_with_only_attnres_keys_missing_and_zero_queries(tmp_path):
    reference, _ = family_pair("llama")
    reference.save_pretrained(tmp_path)
    config = tiny_config("block")
    model, info = AttnResForCausalLM.from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert set(info["missing_keys"]) == attnres_parameter_names(model)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, param in model.named_parameters():
        if name.endswith("_res_proj.weight"):
            assert torch.equal(param, torch.zeros_like(param)), name
        elif name.endswith("_res_norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
    ids = random_ids()
    assert_close(
        model.eval()(ids).logits, reference(ids).logits, "fp32", "llama checkpoint grafted by from_pretrained"
    )


def test_device_map_auto_with_disk_offload_matches(tmp_path):
    """A memory budget too small for the model makes accelerate offload decoder layers to disk and stream them in
    through module hooks, which only fire on module calls: every AttnRes parameter must be read through one."""
    model = attnres_model("block", query_std=0.3)
    model.save_pretrained(tmp_path / "model")
    offloaded = AttnResForCausalLM.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "offload"
    )
    assert "disk" in set(offloaded.hf_device_map.values())
    ids = random_ids()
    # Offloaded layers hold meta tensors outside their forward, so each computes its own phase 1 instead of sharing
    # its block's: the same sums, grouped differently.
    assert_close(offloaded(ids).logits, model(ids).logits, "fp32_regrouped", "disk-offloaded vs in-memory logits")


@pytest.mark.parametrize("hook", ["forward", "forward_pre", "full_backward", "replaced_forward"])
def test_hooked_depth_parameters_are_read_by_calling_their_module(hook):
    """A pseudo-query or key norm with no hooks is read directly (a module call per parameter would cost a decoding
    step more than its aggregations); one that a hook or a replaced `forward` watches is read by calling it, once per
    forward, with the same result. Covers `calls_only_forward`'s reading of nn.Module's hook dictionaries."""
    model = attnres_model("block", query_std=0.3)
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids).logits
    watched = model.model.layers[1].mlp_res_norm
    calls = []
    if hook == "replaced_forward":  # as accelerate's hooks do
        plain_forward = watched.forward
        watched.forward = lambda: calls.append(watched) or plain_forward()
    elif hook == "full_backward":
        watched.register_full_backward_hook(lambda *_: None)
    else:
        getattr(watched, f"register_{hook}_hook")(lambda *_: calls.append(watched))
    called = []
    global_hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, *_: called.append(module) if isinstance(module, (AttnResPseudoQuery, AttnResKeyNorm)) else None
    )
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        global_hook.remove()
    assert called == [watched]  # the other 2L + 1 depth modules were read without a call
    assert len(calls) == (hook != "full_backward")
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_a_checkpoint_loads_into_the_other_mode_with_only_its_mode_changed(tmp_path):
    block = attnres_model("block", query_std=0.3)
    block.save_pretrained(tmp_path)
    config = AttnResConfig.from_pretrained(tmp_path, residual_mode="full")
    model, info = AttnResForCausalLM.from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # same parameters, other source sets
    assert not torch.equal(model.eval()(random_ids()).logits, block(random_ids()).logits)
    copy.deepcopy(model)  # modules hold no per-forward state


def test_the_retired_standard_mode_names_its_replacement():
    from huggingface_hub.errors import StrictDataclassError

    with pytest.raises(StrictDataclassError, match="LlamaForCausalLM"):
        tiny_config("standard")
