"""Tiny random MoE configs, one per experts layout (shared by the MoE tests, test_recipes and
scripts/tiny_moe.py; a helper module, not a test module)."""

import torch
import transformers

MOE = dict(vocab_size=64, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)

# One tiny random config per layout: (E, 2I, H) concatenated (qwen3_moe, qwen2_moe with a shared expert,
# mixtral, olmoe) and gpt-oss's transposed (E, H, 2I), interleaved, biased, clamped experts.
MOE_CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=8, **MOE
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        **MOE,
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **MOE
    ),
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=16, num_experts=4, num_experts_per_tok=2, **MOE),
    "gpt_oss": lambda: transformers.GptOssConfig(
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        layer_types=["full_attention"] * 2,
        **MOE,
    ),
}


def tiny_moe(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(MOE_CONFIGS[family]()).eval()
    with torch.no_grad():  # random biases (gpt-oss): zeros would hide a misread bias layout
        for name, param in model.named_parameters():
            if name.endswith("_bias"):
                param.normal_(0, 0.1)
    return model


# An MoE export's validation error in bf16 (the MoE recipe's dtype): decoding one token, the export sums its k
# experts' down projections in fp32 and rounds once, where the trained model rounds each expert's output to bf16
# (a step of 3.9e-3): 1.4e-3 measured on the qwen2_moe recipe's export. In fp32 the export's kernel path agrees
# with its masked path within 1e-5, and its masked path with the trained model within 1e-5 (tests/model/test_moe.py).
BF16_VALIDATION_ERROR = 3e-3
