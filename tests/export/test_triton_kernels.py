"""The Triton sparse-FFN kernels against the pure-torch reference (on the CPU under
TRITON_INTERPRET=1, set in conftest, where there is no GPU)."""

import pytest
import torch

import lte_kernels.triton_ffn as triton_ffn

SHAPES = [(64, 128, 8), (100, 96, 16), (96, 144, 12)]  # (hidden, neurons, expert_size): 100 and 12 are not powers of 2


def test_triton_is_installed():
    assert triton_ffn.available()  # part of the dev set-up on Linux; without it the GPU path could never be tested


def _case(shape, sparsity, dtype, seed=0, tokens=1):
    hidden, neurons, size = shape
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(neurons, hidden, generator=g).to(dtype)
    weight_t = torch.randn(neurons, hidden, generator=g).to(dtype)
    x = (
        torch.randn(hidden, generator=g).to(dtype)
        if tokens == 1
        else torch.randn(tokens, hidden, generator=g).to(dtype)
    )
    on = torch.rand(neurons // size, generator=g) >= sparsity
    return weight, weight_t, x, on


@pytest.mark.parametrize("tokens", [2, 3, 8])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_small_batch_variant_matches_the_reference(tokens, dtype, tol):
    weight, weight_t, x, _ = _case((100, 96, 12), 0.0, dtype, tokens=tokens)
    on = torch.rand(tokens, 8, generator=torch.Generator().manual_seed(tokens)) > 0.6
    order, count = triton_ffn.select_experts(on)
    union = on.any(dim=0).nonzero().squeeze(1)
    rows = (union[:, None] * 12 + torch.arange(12)).reshape(-1)
    y = triton_ffn.expert_matvec(x, weight, order, count, 12)
    assert y.shape == (tokens, 96)
    want = x.float() @ weight.float()[rows].T
    torch.testing.assert_close(y[:, : rows.numel()].float(), want, atol=tol * (1 + want.abs().amax().item()), rtol=tol)
    out = triton_ffn.expert_matvec_t(y, weight_t, order, count, 12)
    want = y[:, : rows.numel()].float() @ weight_t.float()[rows]
    torch.testing.assert_close(out.float(), want, atol=tol * (1 + want.abs().amax().item()), rtol=tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_expert_matvecs_match_the_reference(shape, sparsity, dtype, tol):
    weight, weight_t, x, on = _case(shape, sparsity, dtype)
    size = shape[2]
    order, count = triton_ffn.select_experts(on)
    experts = on.nonzero().squeeze(1)
    assert int(count) == experts.numel() and torch.equal(order[: experts.numel()].long(), experts)
    rows = (experts[:, None] * size + torch.arange(size)).reshape(-1)
    y = triton_ffn.expert_matvec(x, weight, order, count, size)
    want = weight.float()[rows] @ x.float()
    assert y.dtype == dtype and y.shape == (1, on.numel() * size)
    y = y.reshape(-1)
    scale = 1 + (want.abs().amax().item() if want.numel() else 0)
    torch.testing.assert_close(y[: rows.numel()].float(), want, atol=tol * scale, rtol=tol)
    assert not y[rows.numel() :].any()  # unselected slots stay zero
    y = y.reshape(-1)
    out = triton_ffn.expert_matvec_t(y, weight_t, order, count, size).reshape(-1)
    want = y[: rows.numel()].float() @ weight_t.float()[rows]
    scale = 1 + (want.abs().amax().item() if want.numel() else 0)
    torch.testing.assert_close(out.float(), want, atol=tol * scale, rtol=tol)
    assert torch.equal(triton_ffn.expert_matvec_t(y, weight_t, order, count, size).reshape(-1), out)  # deterministic


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_on_the_gpu_match_the_reference():
    weight, weight_t, x, on = (t.cuda() for t in _case((4096, 11008, 32), 0.5, torch.bfloat16))
    order, count = triton_ffn.select_experts(on)
    experts = on.nonzero().squeeze(1)
    rows = (experts[:, None] * 32 + torch.arange(32, device="cuda")).reshape(-1)
    y = triton_ffn.expert_matvec(x, weight, order, count, 32).reshape(-1)
    torch.testing.assert_close(y[: rows.numel()].float(), weight.float()[rows] @ x.float(), atol=0.5, rtol=2e-2)
    out = triton_ffn.expert_matvec_t(y, weight_t, order, count, 32).reshape(-1)
    torch.testing.assert_close(out.float(), y[: rows.numel()].float() @ weight_t.float()[rows], atol=0.5, rtol=2e-2)


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("hidden", "group"), [(100, 32), (128, 64)])  # 100: rows padded to whole groups
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_rows_match_the_dequantized_reference(bits, hidden, group, sparsity, tokens):
    from lte_kernels import quant

    neurons, size = 256, 64
    g = torch.Generator().manual_seed(11)
    (qweight, scales), (qweight_t, scales_t) = (
        quant.quantize(torch.randn(neurons, hidden, generator=g), bits, group) for _ in range(2)
    )
    dense, dense_t = quant.dequantize(qweight, scales, hidden), quant.dequantize(qweight_t, scales_t, hidden)
    x = torch.randn(tokens, hidden, generator=g)
    on = torch.rand(tokens, neurons // size, generator=g) >= sparsity
    on[:, 0] |= sparsity == 0.0
    order, count = triton_ffn.select_experts(on)
    union = on.any(dim=0).nonzero().squeeze(1)
    rows = (union[:, None] * size + torch.arange(size)).reshape(-1)
    y = triton_ffn.expert_matvec(x, qweight, order, count, size, 0, scales)
    assert y.shape == (tokens, neurons) and y.dtype == torch.float32
    want = x @ dense[rows].T
    scale = 1 + (want.abs().amax().item() if want.numel() else 0)
    torch.testing.assert_close(y[:, : rows.numel()], want, atol=1e-5 * scale, rtol=1e-5)
    assert not y[:, rows.numel() :].any()
    out = triton_ffn.expert_matvec_t(y, qweight_t, order, count, size, scales_t, hidden)
    want = y[:, : rows.numel()] @ dense_t[rows]
    assert out.shape == (tokens, hidden)
    scale = 1 + (want.abs().amax().item() if want.numel() else 0)
    torch.testing.assert_close(out, want, atol=1e-5 * scale, rtol=1e-5)


def test_quantized_rows_refuse_groups_that_straddle_experts():
    from lte_kernels import quant

    qweight, scales = quant.quantize(torch.randn(64, 64), 8)
    order, count = triton_ffn.select_experts(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="straddle two experts"):
        triton_ffn.expert_matvec(torch.randn(64), qweight, order, count, 16, 0, scales)


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("size", [32, 6])
@pytest.mark.parametrize("bits", [8, 4])
def test_the_transposed_product_reads_a_weight_grouped_along_its_inputs(bits, size, tokens):
    """The down projection as `lte export --quantize` stores it ([hidden, neurons], groups of 32 neurons), read
    one row per neuron with a scale per (32 neurons, column), as the CPU kernel does: the stored values."""
    from lte_kernels import quant

    hidden, neurons = 100, 192
    g = torch.Generator().manual_seed(12)
    qweight, scales = quant.quantize(torch.randn(hidden, neurons, generator=g), bits)
    rows_t, column_scales = quant.transposed(quant.unpack(qweight, scales), scales, bits)
    stored = quant.dequantize(qweight, scales).T
    on = torch.rand(tokens, neurons // size, generator=g) >= 0.5
    order, count = triton_ffn.select_experts(on)
    union = on.any(dim=0).nonzero().squeeze(1)
    rows = (union[:, None] * size + torch.arange(size)).reshape(-1)
    h = torch.zeros(tokens, neurons)
    h[:, : rows.numel()] = torch.randn(tokens, rows.numel(), generator=g)
    out = triton_ffn.expert_matvec_t(h, rows_t, order, count, size, column_scales, hidden)
    want = h[:, : rows.numel()] @ stored[rows]
    torch.testing.assert_close(out, want, atol=1e-5 * (1 + want.abs().amax().item()), rtol=1e-5)
    with pytest.raises(ValueError, match="transposed product only"):
        triton_ffn.expert_matvec(torch.randn(tokens, 128), rows_t, order, count, size, 0, column_scales)
