"""Shared fixtures: offline, CPU, tiny models built from configs."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
STORIES = REPO / "assets" / "stories260K"

SMALL = dict(vocab_size=64, num_hidden_layers=2)
ATTN = dict(num_attention_heads=4, num_key_value_heads=2)

# One tiny random config per supported FFN family.
FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, **ATTN, **SMALL),
    "mistral": lambda: transformers.MistralConfig(hidden_size=32, intermediate_size=64, **ATTN, **SMALL),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=32, intermediate_size=64, **ATTN, **SMALL),
    "qwen3": lambda: transformers.Qwen3Config(hidden_size=32, intermediate_size=64, head_dim=8, **ATTN, **SMALL),
    "gemma": lambda: transformers.GemmaConfig(hidden_size=32, intermediate_size=64, head_dim=8, **ATTN, **SMALL),
    "phi3": lambda: transformers.Phi3Config(hidden_size=32, intermediate_size=64, pad_token_id=0, **ATTN, **SMALL),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_inner=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, **SMALL),
    "opt": lambda: transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=1, **SMALL),
}


def tiny_model(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family]()).eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")
