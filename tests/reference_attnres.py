"""A paper-literal AttnRes forward pass, used only as a test oracle.

Written straight from the paper's equations (arXiv:2603.15031, Eq. 1-6 and §3.2), independently of the model's
state passing: it keeps the list of every sublayer output `f_i(h_i)` and, before each sublayer, rebuilds the source
list from scratch (token embedding, block sums `b_n = Σ_{j∈B_n} f_j`, running partial sum `b_n^i`), with blocks
counted in the paper's unit (sublayers, `S = 2 * attn_res_block_size`). It is O(L²) and slow on purpose.

The sublayers themselves (attention, MLP) are the model's modules, which other tests check against transformers'
Llama/Qwen/Mistral classes. The PreNorm eps of a sublayer that reads `n` sources is `ε / n²` (the model docstring
explains why: it makes zero-query AttnRes exactly the PreNorm network).
"""

import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32: x / sqrt(mean(x²) + eps) * weight."""
    x = x.float()
    return weight.float() * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def aggregate(sources: list[torch.Tensor], query: torch.Tensor, key_weight: torch.Tensor, eps: float):
    """Eq. 2-4: h = Σ_i softmax_i(w · RMSNorm(v_i)) v_i, keys normalised, values raw."""
    values = torch.stack([s.float() for s in sources])  # (n, batch, seq, hidden)
    keys = rms_norm(values, key_weight, eps)
    logits = torch.einsum("d,nbtd->nbt", query.float().reshape(-1), keys)
    alpha = logits.softmax(dim=0)
    return torch.einsum("nbt,nbtd->btd", alpha, values), alpha


def sources_before(sublayer: int, outputs: list[torch.Tensor], embedding: torch.Tensor, config) -> list[torch.Tensor]:
    """Eq. 6: the values seen by sublayer `sublayer` (0-based), given the outputs of all earlier sublayers."""
    if config.residual_mode == "full":
        return [embedding] + outputs
    block_sublayers = 2 * config.attn_res_block_size  # the paper's S
    block = sublayer // block_sublayers
    first = block * block_sublayers
    completed = [embedding] + [sum(outputs[k * block_sublayers : (k + 1) * block_sublayers]) for k in range(block)]
    if sublayer == first:
        return completed
    return completed + [sum(outputs[first:sublayer])]


def final_sources(outputs: list[torch.Tensor], embedding: torch.Tensor, config) -> list[torch.Tensor]:
    """§3.2: "the final output layer aggregates all N block representations" (with the embedding, b_0)."""
    if config.residual_mode == "full":
        return [embedding] + outputs
    block_sublayers = 2 * config.attn_res_block_size
    num_blocks = math.ceil(len(outputs) / block_sublayers)
    return [embedding] + [sum(outputs[k * block_sublayers : (k + 1) * block_sublayers]) for k in range(num_blocks)]


def running_sum_after(layer: int, outputs: list[torch.Tensor], config) -> torch.Tensor:
    """What a decoder layer reports as its hidden state: the sum of the sublayer outputs since the last block start
    (Full AttnRes: its MLP output)."""
    if config.residual_mode == "full":
        return outputs[2 * layer + 1]
    block_sublayers = 2 * config.attn_res_block_size
    first = (2 * layer + 1) // block_sublayers * block_sublayers
    return sum(outputs[first : 2 * layer + 2])


def reference_logits(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Logits of an AttnResForCausalLM (block or full mode, eager attention, no padding) computed the naive way, the
    depth-attention weights of every aggregation, each `(batch, seq, num_sources)`, and the hidden state each decoder
    layer reports (`running_sum_after`)."""
    config = model.config
    inner = model.model
    eps = config.rms_norm_eps
    embedding = inner.embed_tokens(input_ids).float()
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq)[None].expand(batch, -1)
    position_embeddings = inner.rotary_emb(embedding, position_ids)
    causal = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)
    mask = causal[None, None].expand(batch, 1, seq, seq)

    outputs: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    for sublayer in range(2 * config.num_hidden_layers):
        layer = inner.layers[sublayer // 2]
        sources = sources_before(sublayer, outputs, embedding, config)
        if sublayer % 2 == 0:
            hidden, alpha = aggregate(
                sources, layer.self_attention_res_proj.weight, layer.self_attention_res_norm.weight, eps
            )
            normed = rms_norm(hidden, layer.input_layernorm.weight, eps / len(sources) ** 2)
            output, _ = layer.self_attn(normed, position_embeddings=position_embeddings, attention_mask=mask)
        else:
            hidden, alpha = aggregate(sources, layer.mlp_res_proj.weight, layer.mlp_res_norm.weight, eps)
            output = layer.mlp(rms_norm(hidden, layer.post_attention_layernorm.weight, eps / len(sources) ** 2))
        outputs.append(output)
        weights.append(alpha.permute(1, 2, 0))

    sources = final_sources(outputs, embedding, config)
    hidden, alpha = aggregate(sources, inner.output_attn_res_proj.weight, inner.output_attn_res_norm.weight, eps)
    weights.append(alpha.permute(1, 2, 0))
    hidden = rms_norm(hidden, inner.norm.weight, eps / len(sources) ** 2)
    layer_outputs = [running_sum_after(layer, outputs, config) for layer in range(config.num_hidden_layers)]
    return model.lm_head(hidden), weights, layer_outputs
