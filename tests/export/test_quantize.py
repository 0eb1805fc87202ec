"""`lte export --quantize int8|int4`: a compressed-tensors checkpoint the base class loads (dense), whose remote
code decodes sparse by reading the selected experts' integer rows as stored."""

import contextlib
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import REPO
from lte.cli import main
from lte.export.exporter import (
    base_architecture,
    decoding_context,
    quantize_in_memory,
    to_routed,
    write_checkpoint,
)
from lte.export.quantize import (
    InputImportance,
    KernelActivations,
    compress_checkpoint,
    dequantized,
    fitted_scales,
    plan,
)
from lte.model.inject import LTEModelConfig, inject_lte, lte_layers, set_lte_routing
from lte_kernels.quant import group_scales, integers


class _Wrapper(torch.nn.Module):  # what PEFT's adapter layers look like from outside: the original as base_layer
    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, x):
        return self.base_layer(x)


def _quantized_export(scheme: str, out, dtype=torch.float32, **save_kwargs):
    """A tiny Llama (widths multiples of 32, experts of 32 neurons) with LTE, quantized in memory as `lte
    export` does, exported and compressed; returns the logits the in-memory model gave."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval().to(dtype)
    inject_lte(model, LTEModelConfig(expert_size=32, router_init="centroid"), progress=False)
    set_lte_routing(model, "hard")
    quant = quantize_in_memory(model, scheme)
    thresholds = [0.5, 0.5]
    for layer, threshold in zip(lte_layers(model), thresholds, strict=True):
        layer.threshold = threshold
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = {"full": model(ids).logits, "token": model(ids[:1, :1]).logits, "few": model(ids[:, :2]).logits}
        with KernelActivations(quant.modules):  # what the CPU kernel computes decoding: int8 activation blocks
            expected |= {"token_cpu": model(ids[:1, :1]).logits, "few_cpu": model(ids[:, :2]).logits}
        set_lte_routing(model, "dense")
        expected["dense"] = model(ids).logits
        set_lte_routing(model, "hard")
    base = base_architecture(model)
    to_routed(model, thresholds)
    out.mkdir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K")
    write_checkpoint(model, tokenizer, out, base, **save_kwargs)
    report = compress_checkpoint(out, model, quant)
    # the file holds exactly the weights the thresholds were tuned on (no second rounding on the way)
    files = {}
    for shard in sorted(out.glob("*.safetensors")):
        files |= load_file(shard)
    for name, module in quant.names(model)[0].items():
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        q = unpack_from_int32(files[f"{name}.weight_packed"], quant.bits, module.weight.shape)
        stored = dequantized(q, files[f"{name}.weight_scale"], module.weight.dtype)
        assert torch.equal(stored, module.weight.detach().contiguous()), name
    return ids, expected, report


@pytest.mark.parametrize(
    ("scheme", "bits", "dtype", "shard"),
    [("int8", 8, torch.float32, None), ("int4", 4, torch.float32, "60KB"), ("int8", 8, torch.bfloat16, None)],
)
def test_a_quantized_export_loads_dense_in_the_base_class_and_decodes_sparse_on_its_integers(
    tmp_path, scheme, bits, dtype, shard
):
    saving = {"max_shard_size": shard} if shard else {}
    ids, expected, report = _quantized_export(scheme, tmp_path / "export", dtype, **saving)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    index = tmp_path / "export" / "model.safetensors.index.json"
    assert index.is_file() == bool(shard)  # several shards: their index names every packed tensor
    if shard:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert "model.layers.1.mlp.down_proj.weight_packed" in weight_map and not any(
            k.endswith("mlp.down_proj.weight") for k in weight_map
        )
    # every Linear but lm_head quantized (widths are multiples of 32): 8.5 / 4.5 bits per weight
    assert report["bits_per_quantized_weight"] == bits + 0.5 and list(report["kept_float"]) == ["lm_head"]
    assert report["quantized_weights"] == 2 * (4 * 64 * 64 + 3 * 64 * 128)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert q["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    files = {}
    for path in sorted((tmp_path / "export").glob("*.safetensors")):
        files |= load_file(path)
    assert "model.layers.0.mlp.down_proj.weight" not in files
    assert files["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.int32
    assert files["model.layers.0.mlp.down_proj.weight_packed"].shape == (64, 128 * bits // 32)

    with torch.no_grad():
        # the base class (transformers + compressed-tensors): the quantized model, every expert
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=dtype).eval()
        assert type(base) is transformers.LlamaForCausalLM
        assert (base(ids).logits - expected["dense"]).abs().max() < tolerance / 10

        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "export", trust_remote_code=True, dtype=dtype
        ).eval()
        modeling = __import__(type(model).__module__, fromlist=["_cpu_kernel_available"])
        assert modeling._cpu_kernel_available()
        mlps = [layer.mlp for layer in model.model.layers]
        assert mlps[0].gate_proj.lte_qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
        assert mlps[0].down_proj.lte_qscales.shape == (128 // 32, 64)  # per (32 neurons, output column): as stored
        assert (model(ids).logits - expected["full"]).abs().max() < tolerance
        token = model(ids[:1, :1]).logits
        assert (token - expected["token_cpu"]).abs().max() < tolerance
        assert (model(ids[:, :2]).logits - expected["few_cpu"]).abs().max() < tolerance
        assert (model(ids).logits - expected["dense"]).abs().max() > 1e-3  # experts are skipped
        attention = model.model.layers[0].self_attn
        assert all(getattr(attention, p).lte_qweight is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert model.lm_head.weight.dtype == dtype and not hasattr(model.lm_head, "lte_qweight")  # kept float
        # Decoding reads each projection's integer rows (the FFN's selected experts', attention's every row):
        # doubling one projection's scales changes a token's logits, and not the masked path's (more tokens than
        # the kernels take: the dequantized weights). (Not q or k: one token attends to itself alone.)
        for projection in (mlps[0].gate_proj, mlps[0].up_proj, mlps[0].down_proj, attention.v_proj, attention.o_proj):
            projection.lte_qscales.mul_(2)
            assert (model(ids[:1, :1]).logits - token).abs().max() > 1e-3, projection
            assert (model(ids).logits - expected["full"]).abs().max() < tolerance
            projection.lte_qscales.div_(2)
        assert (model(ids[:1, :1]).logits - token).abs().max() < tolerance
        pair = model(ids[:1, :2]).logits  # two tokens: the second attends to both, so q and k matter too
        for projection in (attention.q_proj, attention.k_proj):
            projection.lte_qscales.mul_(2)
            assert (model(ids[:1, :2]).logits - pair).abs().max() > 1e-3, projection
            projection.lte_qscales.div_(2)
        attention.k_proj.weight.mul_(2)  # written through the parameter: its rows are dropped, not read stale
        model(ids[:1, :1])
        assert attention.k_proj.lte_qweight is None and attention.q_proj.lte_qweight is not None
        attention.k_proj.weight.div_(2)
        # Rows made before a weight was written are dropped, never read: decoding then runs the new weights.
        mlps[0].down_proj.weight.mul_(0.5)
        halved = model(ids[:1, :1]).logits
        assert mlps[0].down_proj.lte_qweight is None and mlps[0].gate_proj.lte_qweight is not None
        assert (halved - token).abs().max() > 1e-3
        # A layer an adapter wraps drops its rows (the adapter's output is base + delta, a merge writes .data).
        attention.o_proj = _Wrapper(attention.o_proj)
        model(ids[:1, :1])
        assert attention.o_proj.base_layer.lte_qweight is None and attention.v_proj.lte_qweight is not None
        # A write through .data (PEFT's merge) is not seen; lte_drop_quantized_rows() says so to the model.
        mlps[1].up_proj.weight.data.mul_(0.5)
        assert mlps[1].up_proj.lte_qweight is not None
        before = model(ids[:1, :1]).logits
        model.lte_drop_quantized_rows()
        assert all(getattr(m, "lte_qweight", None) is None for m in model.modules())
        assert (model(ids[:1, :1]).logits - before).abs().max() > 1e-3  # now the float weights, halved


@pytest.mark.parametrize("expert_size", [32, 4])
def test_the_reload_check_rounds_the_inputs_of_the_layers_the_export_decodes_on_integers(expert_size, monkeypatch):
    """decoding_context mirrors the remote code: on the CPU kernel, experts of whole groups round every quantized
    layer's input; 4-neuron experts (their FFN decodes on float rows) only attention's; elsewhere nothing."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
    )
    model = transformers.LlamaForCausalLM(config).eval()
    inject_lte(model, LTEModelConfig(expert_size=expert_size, router_init="centroid"), progress=False)
    quant = quantize_in_memory(model, "int8")
    cpu = torch.device("cpu")
    attention = [m for name, m in model.named_modules() if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    read = decoding_context(model, quant, cpu, torch.float32)().modules
    assert {id(m) for m in read} == {id(m) for m in (quant.modules if expert_size == 32 else attention)}
    assert decoding_context(model, quant, cpu, torch.bfloat16)().modules == read
    for unrounded in (
        decoding_context(model, None, cpu, torch.float32),  # not quantized
        decoding_context(model, quant, cpu, torch.float16),  # the remote code's torch path
    ):
        assert unrounded is contextlib.nullcontext
    monkeypatch.setenv("LTE_FORCE_TRITON", "1")  # the interpreter's Triton path (installed here): as they are
    assert decoding_context(model, quant, cpu, torch.float32) is contextlib.nullcontext


def test_the_triton_decode_path_reads_the_same_integers_in_the_interpreter(tmp_path):
    """LTE_FORCE_TRITON's path (TRITON_INTERPRET=1, set by conftest): the Triton kernels read the export's
    integer rows, the down projection's column-scaled ones included, as the CPU kernel does."""
    ids, expected, _ = _quantized_export("int4", tmp_path / "export")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True).eval()
    modeling = __import__(type(model).__module__, fromlist=["_FORCE_TRITON"])
    modeling._FORCE_TRITON = True
    try:
        assert modeling._use_triton(torch.device("cpu"))
        with torch.no_grad():
            token = model(ids[:1, :1]).logits
            assert (token - expected["token"]).abs().max() < 1e-4
            assert (model(ids[:, :2]).logits - expected["few"]).abs().max() < 1e-4
            mlp, attention = model.model.layers[0].mlp, model.model.layers[0].self_attn
            for projection in (mlp.gate_proj, mlp.up_proj, mlp.down_proj, attention.o_proj):  # each reads its rows
                projection.lte_qscales.mul_(2)
                assert (model(ids[:1, :1]).logits - token).abs().max() > 1e-3, projection
                projection.lte_qscales.div_(2)
    finally:
        modeling._FORCE_TRITON = False


def _group_errors(weight, scales, bits, importance):
    error = (weight - dequantized(integers(weight, scales, bits), scales, torch.float32)).square() * importance
    return error.reshape(weight.shape[0], scales.shape[1], -1).sum(-1)


@pytest.mark.parametrize("bits", [4, 8])
def test_searched_scales_beat_max_abs_per_group_and_follow_the_inputs_that_matter(bits):
    """The clip search never does worse than max|w| / qmax in any group, clearly better for int4 (heavy-tailed
    weights), and with an importance per input it trades error on idle inputs for error on busy ones; its scales
    are exact in fp16 (what the kernels read) and in the model's dtype."""
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(4.0).sample((64, 256))
    uniform = torch.ones(256)
    plain = group_scales(weight, bits, 32, torch.float32)
    searched = fitted_scales(weight, bits, 32, torch.float32)
    before, after = _group_errors(weight, plain, bits, uniform), _group_errors(weight, searched, bits, uniform)
    assert (after <= before * (1 + 1e-6)).all()
    assert after.sum() < (0.85 if bits == 4 else 1.0) * before.sum()  # measured: 0.82 for int4
    busy = torch.rand(256, generator=torch.Generator().manual_seed(1)) ** 4 * 100  # a few inputs dominate
    weighted = fitted_scales(weight, bits, 32, torch.float32, busy)
    aware, blind = _group_errors(weight, weighted, bits, busy), _group_errors(weight, searched, bits, busy)
    assert (aware <= blind * (1 + 1e-6)).all()
    assert aware.sum() < (0.97 if bits == 4 else 1.0) * blind.sum()
    bf16 = fitted_scales(weight.bfloat16(), bits, 32, torch.bfloat16)
    assert torch.equal(bf16, bf16.to(torch.float16).float()) and torch.equal(bf16, bf16.bfloat16().float())
    assert torch.equal(searched, searched.to(torch.float16).float())


def test_signed_scales_round_as_llama_cpp_q4_0_stores_them():
    """llama.cpp's Q4_0 signs a group's scale (its largest weight lands on -8): integers() keeps the sign."""
    weight = torch.tensor([[0.5, -0.1, 0.2, 0.05] * 8, [-0.4, 0.1, 0.3, -0.2] * 8])
    signed = weight[torch.arange(2), weight.abs().argmax(dim=1)].unsqueeze(1) / -8  # [-0.0625], [0.05]
    q = integers(weight, signed, 4)
    assert q.min() >= -8 and q.max() <= 7 and q[0, 0] == -8 and q[1, 0] == -8
    assert (dequantized(q, signed, torch.float32) - weight).abs().max() <= signed.abs().max() / 2 + 1e-7


def test_the_exporter_weighs_every_quantized_layer_by_its_calibration_inputs(monkeypatch):
    """quantize_in_memory with calibration batches: the pre-hooks see every planned Linear of the in-memory LTE
    model (attention, the routed FFNs), so no layer falls back to the unweighted search."""
    import lte.export.exporter as exporter

    seen = {}

    def capture(quant, importance=None):
        seen.update(quant=quant, importance=importance)

    monkeypatch.setattr(exporter, "fake_quantize_", capture)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
    )
    model = transformers.LlamaForCausalLM(config).eval()
    inject_lte(model, LTEModelConfig(expert_size=32, router_init="centroid"), progress=False)
    set_lte_routing(model, "hard")
    ids = torch.randint(0, 96, (2, 12))
    quantize_in_memory(model, "int4", [{"input_ids": ids, "labels": ids}])
    planned = seen["quant"].modules
    assert len(planned) == 14  # 4 attention + 3 FFN projections per layer; lm_head stays float
    assert all(
        seen["importance"].of(m) is not None and seen["importance"].of(m).shape == (m.in_features,) for m in planned
    )


def test_input_importance_is_the_mean_squared_input_of_each_module():
    first, second = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    x = torch.randn(5, 7, 4)
    with InputImportance([first, second]) as importance:
        second(first(x))
        first(x[:, :1])
    expected = torch.cat([x.reshape(-1, 4), x[:, :1].reshape(-1, 4)]).square().mean(0)
    assert torch.allclose(importance.of(first), expected)
    assert torch.allclose(importance.of(second), first(x).detach().reshape(-1, 3).square().mean(0))
    assert importance.of(torch.nn.Linear(2, 2)) is None
    assert not first._forward_pre_hooks  # the hooks are gone after the block


def test_quantize_without_compressed_tensors_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "compressed_tensors" else find_spec(name, *a)
    )
    code = main(
        ["export", str(tmp_path), "--target-sparsity", "0.5", "--quantize", "int4", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "pip install compressed-tensors" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_quantize_refuses_moe_models_and_models_without_a_quantizable_linear():
    from lte.core.errors import UsageError
    from moe_configs import tiny_moe

    model = tiny_moe("qwen2_moe")
    inject_lte(model, LTEModelConfig(expert_size=4, router_init="centroid"), progress=False)
    with pytest.raises(UsageError, match="not built for mixture-of-experts exports"):
        quantize_in_memory(model, "int8")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UsageError, match="Conv1D layers are not quantized"):
        plan(gpt2, "int8")


def test_quantize_is_refused_with_one_message_before_any_work(tmp_path, capsys):
    run = tmp_path / "no-run"
    run.mkdir()
    code = main(["export", str(run), "--target-sparsity", "0.5", "--quantize", "int3", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--quantize: invalid choice: 'int3'" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_lte_export_quantize_on_a_trained_run_reports_what_it_quantized(tiny_run, tmp_path, capsys):
    """The command on the smoke run (stories260K: 64-wide, 172 FFN neurons): attention and gate/up are quantized,
    the down projections (172 inputs) and the tied lm_head stay float and are named; thresholds are tuned and the
    reload checked on the quantized model, which the base class loads as is."""
    out, _ = tiny_run
    export_dir = tmp_path / "int8"
    argv = ["export", str(out), "--target-sparsity", "0.5", "--calibration-tokens", "4096", "--quantize", "int8"]
    assert main([*argv, "--out", str(export_dir)]) == 0
    summary = capsys.readouterr().out
    assert "weights       int8 (groups of 32, 8.5 bits) for 66% of the weights" in summary
    assert "172 inputs are not a multiple of the group size 32" in summary
    report = json.loads((export_dir / "lte_export.json").read_text())
    q = report["quantization"]
    assert q["scheme"] == "int8" and q["bits_per_quantized_weight"] == 8.5
    assert sorted(q["kept_float"]) == ["lm_head", *(f"model.layers.{i}.mlp.down_proj" for i in range(5))]
    assert abs(report["heldout_sparsity"] - 0.5) < 0.03 and report["validation_error"] < 1e-3
    config = json.loads((export_dir / "config.json").read_text())
    assert sorted(config["quantization_config"]["ignore"]) == sorted(q["kept_float"])
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()
        assert type(base) is transformers.LlamaForCausalLM
        assert base.model.layers[0].mlp.gate_proj.weight_packed.dtype == torch.int32  # compressed until a forward
        assert torch.isfinite(base(torch.tensor([[1, 2, 3]])).logits).all()
        assert base.model.layers[0].mlp.gate_proj.weight.shape == (172, 64)  # then the dequantized weight
