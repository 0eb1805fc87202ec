"""Instruction tuning end to end on real Alpaca records (tests/data/alpaca) with the tiny model."""

import json

import pytest
import torch

from conftest import TEST_DATA, run_train
from lte.training.data import ALPACA_CHAT_TEMPLATE

ALPACA = TEST_DATA / "alpaca"


@pytest.mark.slow
def test_instruction_tuned_sparse_export_is_prompted_with_its_chat_template(tmp_path):
    out = tmp_path / "run"
    run_train(
        out,
        f"data.train={ALPACA / 'alpaca_data_500.json'}",
        f"data.eval={ALPACA / 'alpaca_plus_validation_unseen_200.json'}",
        "data.format=instruction",
        "data.block_size=256",
        "data.max_train_tokens=null",
        "lte.stage1_steps=20",
        "lte.stage2_steps=20",
        "export.allocation=uniform",
        "train.save_steps=20",
    )
    report = json.loads((out / "report.json").read_text())
    # Held-out perplexity of the responses to unseen instructions (prompt tokens are not scored):
    # the instruction-tuned sparse model beats the original story model at over 50% sparsity.
    assert report["sparsity"] > 0.5 and report["sparse_ppl"] < 0.8 * report["dense_ppl"], report
    exported = json.loads((out / "export" / "lte_export.json").read_text())
    assert exported["sparse_ppl"] < 0.8 * exported["original_ppl"] and abs(exported["heldout_sparsity"] - 0.5) < 0.03

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "export", trust_remote_code=True)
    assert tokenizer.chat_template == ALPACA_CHAT_TEMPLATE  # saved with the model: prompted as it was trained
    model = AutoModelForCausalLM.from_pretrained(out / "export", trust_remote_code=True)
    messages = [{"role": "user", "content": "Name three colors."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    assert tokenizer.decode(ids[0]).endswith("### Response:\n")
    generated = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert generated.shape[1] > ids.shape[1] and torch.equal(generated[0, : ids.shape[1]], ids[0])
