"""The vLLM plugin's routed FFN functions without vLLM (they import without it): the kernel path (a few
tokens over the union of their experts) and the masked dense path (more tokens) give the FFN of the
selected experts, in fp32 and bf16. The vLLM environment's tests check them inside vLLM's model classes."""

import pytest
import torch
import torch.nn.functional as F

from lte.serve.vllm_plugin import MAX_UNION_TOKENS, UnsupportedExport, _kernels, check_hosts, routed_down, routed_first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, MAX_UNION_TOKENS, 3 * MAX_UNION_TOKENS])
def test_both_paths_compute_the_selected_experts_ffn(dtype, tokens):
    hidden, experts, size = 64, 16, 32
    g = torch.Generator().manual_seed(tokens)
    gate_up = (torch.randn(2 * experts * size, hidden, generator=g) / hidden**0.5).to(dtype)
    down = (torch.randn(hidden, experts * size, generator=g) / (experts * size) ** 0.5).to(dtype)
    down_stored = down.t().contiguous().t()  # the plugin's layout: one row per neuron (as process_weights does)
    router = torch.randn(experts, hidden, generator=g)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    threshold = 0.5
    order = torch.arange(experts, dtype=torch.int32)
    count = torch.zeros(1, dtype=torch.int32)

    assert _kernels(gate_up) is not None  # the kernel path for the first two cases, not the masked one again
    h = routed_first(x, gate_up, None, router, None, order, count, threshold, size, 2, 0, True)
    gate, up = h.chunk(2, dim=-1)
    out = routed_down(F.silu(gate) * up, down_stored, order, count, size)

    on = torch.sigmoid(x.float() @ router.T) > threshold
    assert 0 < on.float().mean() < 1  # some experts skipped, some run
    keep = on.repeat_interleave(size, dim=-1).double()
    g_ref, u_ref = (x.double() @ gate_up.double().T).chunk(2, dim=-1)
    want = ((F.silu(g_ref) * u_ref) * keep) @ down.double().T
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    assert (out.double() - want).abs().max() <= tolerance * want.abs().max()


def test_routing_inside_moe_experts_is_refused_never_served_dense():
    dense = {"path": "model.layers.0.mlp.shared_expert", "first": ["gate_proj", "up_proj"], "down": "down_proj"}
    check_hosts({"expert_size": 4, "hosts": [dense]})  # a dense FFN (a shared expert too) is routed
    routed = {"path": "model.layers.0.mlp.experts", "first": ["gate_up_proj"], "down": "down_proj", "experts": True}
    with pytest.raises(UnsupportedExport, match=r"model\.layers\.0\.mlp\.experts and 1 more.*VLLM_PLUGINS"):
        check_hosts({"expert_size": 4, "hosts": [dense, routed, {**routed, "path": "model.layers.1.mlp.experts"}]})
