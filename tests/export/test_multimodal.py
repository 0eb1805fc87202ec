"""A multimodal checkpoint (Gemma 3 ``...ForConditionalGeneration``): LTE on the language model's
FFNs only (a text forward never runs the vision tower, so its MLPs stay dense), and an export
whose ``auto_map`` names every Auto class of the base class, so AutoModelForImageTextToText with
remote code runs sparse, and an image + text forward runs."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from conftest import STORIES
from lte.export.exporter import auto_map, base_architecture, to_routed, write_checkpoint
from lte.model.inject import LTEModelConfig, inject_lte, lte_layers, set_lte_routing

IMAGE_TOKEN = 5


def _tiny_gemma3():
    from transformers import Gemma3Config

    config = Gemma3Config(
        text_config={
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "sliding_window": 64,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        mm_tokens_per_image=1,
        image_token_index=IMAGE_TOKEN,
        boi_token_index=6,
        eoi_token_index=7,
    )
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).float().eval()


def test_auto_map_names_every_auto_class_of_the_base_class():
    gemma3 = auto_map("gemma3", "Gemma3ForConditionalGeneration")
    assert gemma3["AutoModelForImageTextToText"] == gemma3["AutoModelForCausalLM"] == "modeling_lte.LTEForCausalLM"
    assert set(auto_map("llama", "LlamaForCausalLM")) == {"AutoConfig", "AutoModelForCausalLM"}


def test_gemma3_multimodal_language_model_only_and_image_text_forward(tmp_path):
    model = _tiny_gemma3()
    inject_lte(model, LTEModelConfig(expert_size=16, router_init="centroid"), progress=False)
    paths = {name for name, module in model.named_modules() if module in lte_layers(model)}
    assert paths and all(".language_model." in f".{p}." for p in paths), paths  # the vision tower stays dense
    assert not any("vision" in p for p in paths)
    set_lte_routing(model, "hard")
    thresholds = [0.5] * len(paths)
    base = base_architecture(model)
    to_routed(model, thresholds)
    ids = torch.randint(8, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    ids[0, 3] = IMAGE_TOKEN  # mm_tokens_per_image=1: one image token
    pixels = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
    write_checkpoint(model, AutoTokenizer.from_pretrained(STORIES), tmp_path, base)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_lte.LTEForCausalLM"

    dense = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(dense).__name__ == "Gemma3ForConditionalGeneration"
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        sparse = auto.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32).eval()
        assert type(sparse).__name__ == "LTEForCausalLM", auto
        with torch.no_grad():
            logits = sparse(input_ids=ids, pixel_values=pixels).logits
        assert torch.isfinite(logits).all()
        error = float((logits - expected).norm() / expected.norm())
        assert error < 1e-4, (auto, error)  # the export runs what the in-memory routed model ran
    with torch.no_grad():
        reference = dense(input_ids=ids, pixel_values=pixels).logits
    # Routers are random here (no training): the sparse model differs from the dense one on the image
    # token too, and by a bounded amount; the numbers are printed for the record.
    image = (ids[0] == IMAGE_TOKEN).nonzero().flatten()
    image_error = float((logits[0, image] - reference[0, image]).norm() / reference[0, image].norm())
    print(f"relative logit error on the image token, sparse vs dense: {image_error:.3f}")
    assert 0 < image_error < 2
