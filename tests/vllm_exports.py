"""Tiny LTE exports that vLLM's CPU build can run (head size 32: its CPU attention takes 32, 64, 80...).

Random Llama/Qwen2/Qwen3 models (hidden 128, 4 heads, 2 KV heads, FFN 256 = 8 experts of 32, 2 layers,
stories260K's 512-token tokenizer with a chat template), exported by the project's own exporter code
(``to_routed`` + ``write_checkpoint``): the files ``lte export`` writes. Thresholds are the median router
score on random tokens (about half the experts run), except where a layer keeps all (-1). Mixture-of-experts
models (``qwen3_moe``, ``qwen2_moe``) route inside their experts at threshold 0.5 on centroid routers.
Run as a script (``python tests/vllm_exports.py FAMILY OUT``) or imported.
"""

import sys
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
EXPERT_SIZE = 32
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
DIMS = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**DIMS),
    "qwen2": lambda: transformers.Qwen2Config(**DIMS),
    "qwen3": lambda: transformers.Qwen3Config(head_dim=32, **DIMS),
    "mistral": lambda: transformers.MistralConfig(head_dim=32, **DIMS),
    "gemma": lambda: transformers.GemmaConfig(head_dim=32, **DIMS),
    "phi3": lambda: transformers.Phi3Config(pad_token_id=0, **DIMS),  # a fused gate_up projection
    "gpt2": lambda: transformers.GPT2Config(  # a plain MLP with biases, Conv1D weights
        vocab_size=512, n_embd=128, n_inner=256, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
    ),
}
# Mixture-of-experts: 4 routed experts of 64 neurons (4 LTE groups of 16 each), top-2 (+ a shared expert).
MOE = dict(moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, head_dim=32)
CONFIGS |= {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**DIMS, **MOE),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**DIMS, **MOE, shared_expert_intermediate_size=128),
}
MOE_EXPERT_SIZE = 16
KEEP_ALL_LAYER = {"qwen3": 1}  # one family exports a layer that keeps every expert (threshold -1)


def tiny_base(family: str, seed: int = 0, **dims):
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config.update(dims)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger FFN weights than the default init: routing changes the logits visibly
        for name, param in model.named_parameters():
            if "mlp" in name:
                param.mul_(4)
    return model


def median_thresholds(model, ids: torch.Tensor) -> list[float]:
    """Per layer, the median of its router's sigmoid scores on ``ids``: about half the experts run."""
    from lte.export.remote.modeling_lte import RoutedFirst

    routers = [m for m in model.modules() if isinstance(m, RoutedFirst) and m.router is not None]
    scores = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: scores.append(torch.sigmoid(mod.router(args[0])).flatten()))
        for m in routers
    ]
    model.config.lte_routing = "dense"
    with torch.no_grad():
        model(ids)
    model.config.lte_routing = "hard"
    for hook in hooks:
        hook.remove()
    return [s.median().item() for s in scores]


def export_tiny(
    family: str, out: Path, dtype: torch.dtype = torch.float32, quantize: str | None = None, **dims
) -> Path:
    """Write an LTE export of a tiny random ``family`` model to ``out`` (``dims``: config overrides;
    ``quantize``: int8 / int4, as ``lte export --quantize``); returns ``out``."""
    from lte.export.exporter import base_architecture, quantize_in_memory, to_routed, write_checkpoint
    from lte.export.quantize import compress_checkpoint
    from lte.model.inject import LTEModelConfig, inject_lte, lte_layers, set_lte_routing

    out = Path(out)
    model = tiny_base(family, **dims)
    moe = family.endswith("_moe")
    size = MOE_EXPERT_SIZE if moe else EXPERT_SIZE
    inject_lte(model, LTEModelConfig(expert_size=size, router_init="centroid"), progress=False)
    if moe:
        set_lte_routing(model, "hard")
    quant = None
    if quantize is not None:
        assert dtype == torch.float32, "quantize here before model.to(dtype) below: fp32 exports only"
        quant = quantize_in_memory(model, quantize)
    base = base_architecture(model)
    hosts = len(lte_layers(model))
    if moe:  # threshold 0.5 on centroid routers (the median rule below reads dense FFNs' routers)
        to_routed(model, [0.5] * hosts)
    else:
        to_routed(model, [-1.0] * hosts)
        ids = torch.randint(3, DIMS["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(1))
        thresholds = median_thresholds(model, ids)
        if family in KEEP_ALL_LAYER:
            thresholds[KEEP_ALL_LAYER[family]] = -1.0
        model.config.lte_thresholds = thresholds
    model.to(dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K")
    tokenizer.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True)
    write_checkpoint(model, tokenizer, out, base)
    if quant is not None:
        compress_checkpoint(out, model, quant)
    return out


if __name__ == "__main__":
    export_tiny(sys.argv[1], Path(sys.argv[2]), quantize=sys.argv[3] if len(sys.argv) > 3 else None)
