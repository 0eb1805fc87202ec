"""Load-time cost of an export's down-projection re-layout (README, "The down projection's memory layout").

A random LTE model of TinyLlama's FFN shape (hidden 2048, FFN 5632, 4 layers, 32k vocabulary) is built
from a config; the script times ``relayout_routed_ffns`` (the in-place re-striding ``from_pretrained``
runs) and ``from_pretrained`` of the saved checkpoint against the base class, in fp32 and bf16, on one
thread. Run: ``python bench/export_load_cost.py``.
"""

import tempfile
import time

import torch
import transformers

from lte.export.remote.modeling_lte import LTEConfig, LTEForCausalLM, relayout_routed_ffns

torch.set_num_threads(1)
n = 4
cfg = LTEConfig(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=n,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    lte_ffn={
        "expert_size": 32,
        "router_bias": False,
        "hosts": [
            {"path": f"model.layers.{i}.mlp", "first": ["gate_proj", "up_proj"], "down": "down_proj", "fused_chunks": 1}
            for i in range(n)
        ],
    },
    lte_thresholds=[0.5] * n,
)
for dtype in (torch.float32, torch.bfloat16):
    m = LTEForCausalLM(cfg).to(dtype)
    times = []
    for _ in range(3):
        for layer in m.model.layers:  # back to the base layout
            w = layer.mlp.down_proj.weight
            w.data = w.data.contiguous()
        t = time.perf_counter()
        relayout_routed_ffns(m)
        times.append(time.perf_counter() - t)
    print(dtype, "relayout of", n, "down projections (2048x5632):", [round(1e3 * x, 1) for x in times], "ms")
    d = tempfile.mkdtemp()
    m.save_pretrained(d)
    t = time.perf_counter()
    transformers.LlamaForCausalLM.from_pretrained(d, dtype=dtype)
    base = time.perf_counter() - t
    t = time.perf_counter()
    LTEForCausalLM.from_pretrained(d, dtype=dtype)
    lte = time.perf_counter() - t
    print(dtype, f"from_pretrained: base class {base:.2f} s, LTE {lte:.2f} s")
