"""lte.tools.convert: llama2.c -> Hugging Face conversion of stories260K, and the shipped assets/stories260K.

The original llama2.c files are in tests/data/stories260K (with their SOURCE.md).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import struct
from pathlib import Path

import pytest
import torch

from conftest import STORIES as ASSET, TEST_DATA
from lte.core.errors import UsageError
from lte.tools import convert as convert_module
from lte.tools.convert import convert_llama2c

ORIGINAL = TEST_DATA / "stories260K"
MODEL_BIN = ORIGINAL / "stories260K.bin"
TOKENIZER_MODEL = ORIGINAL / "tok512.model"

# llama2.c's run.c prints this (and more) at temperature 0 for the prompt "Once upon a time".
REFERENCE_START = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."

ROUND_TRIP_TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "“I want to play!” said Tim. His mom smiled and said, “Okay, but be careful.”",
    "Sue’s dog was 3 years old. She had 12 toys and 1 big red ball.",
    "They went to the park.\nThe sun was shining.\n\nThe end.",
    "Ben was sad... then he saw a café with a 🙂 on the sign!",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert_llama2c(MODEL_BIN, TOKENIZER_MODEL, tmp_path_factory.mktemp("convert") / "stories260K")


def load(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_greedy_decoding_reproduces_llama2c(converted):
    model, tokenizer = load(converted)
    prompt = tokenizer("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**prompt, do_sample=False, max_new_tokens=40)
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    assert text.startswith(REFERENCE_START), text


def test_shipped_asset_matches_fresh_conversion(converted):
    shipped, shipped_tokenizer = load(ASSET)
    fresh, fresh_tokenizer = load(converted)
    assert shipped.config.tie_word_embeddings and shipped.lm_head.weight is shipped.model.embed_tokens.weight
    ids = fresh_tokenizer(ROUND_TRIP_TEXTS[1] + " " + ROUND_TRIP_TEXTS[3])["input_ids"]
    assert shipped_tokenizer(ROUND_TRIP_TEXTS[1] + " " + ROUND_TRIP_TEXTS[3])["input_ids"] == ids
    torch.testing.assert_close(logits(shipped, ids), logits(fresh, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", ["fresh", "shipped"])
def test_tokenizer_round_trip_matches_sentencepiece(converted, which):
    import sentencepiece
    from transformers import AutoTokenizer

    reference = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER_MODEL))
    tokenizer = AutoTokenizer.from_pretrained(converted if which == "fresh" else ASSET)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == [1, *reference.encode(text)], text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_untied_classifier_checkpoint(converted, tmp_path):
    # Same weights, but stored the way llama2.c exports an untied model: vocab_size negated in the
    # header and a classifier matrix [vocab, dim] after the RoPE tables. Here it equals the embedding.
    data = MODEL_BIN.read_bytes()
    header = list(struct.unpack_from("<7i", data))
    dim, vocab = header[0], header[5]
    header[5] = -vocab
    embedding = data[28 : 28 + 4 * vocab * dim]
    untied_bin = tmp_path / "untied.bin"
    untied_bin.write_bytes(struct.pack("<7i", *header) + data[28:] + embedding)

    out = convert_llama2c(untied_bin, TOKENIZER_MODEL, tmp_path / "untied")
    untied, tokenizer = load(out)
    tied, _ = load(converted)
    assert not untied.config.tie_word_embeddings
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    ids = tokenizer(ROUND_TRIP_TEXTS[0])["input_ids"]
    torch.testing.assert_close(logits(untied, ids), logits(tied, ids), atol=1e-6, rtol=0)


def test_missing_files_raise_usage_error(tmp_path):
    with pytest.raises(UsageError, match="checkpoint not found"):
        convert_llama2c(tmp_path / "nope.bin", TOKENIZER_MODEL, tmp_path / "out")
    with pytest.raises(UsageError, match="tokenizer not found"):
        convert_llama2c(MODEL_BIN, tmp_path / "nope.model", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_truncated_checkpoint_raises_usage_error(tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(MODEL_BIN.read_bytes()[:-1000])
    with pytest.raises(UsageError, match="truncated"):
        convert_llama2c(truncated, TOKENIZER_MODEL, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.bin"]


def test_wrong_tokenizer_raises_usage_error(tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    # llama2.c's own tokenizer export is not a SentencePiece model.
    with pytest.raises(UsageError, match="not a SentencePiece model"):
        convert_llama2c(MODEL_BIN, ORIGINAL / "tok512.bin", tmp_path / "out")
    # A real SentencePiece model whose vocabulary doesn't fit the checkpoint.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(TOKENIZER_MODEL.read_bytes())
    del proto.pieces[400:]
    proto.trainer_spec.vocab_size = 400
    smaller = tmp_path / "tok400.model"
    smaller.write_bytes(proto.SerializeToString())
    with pytest.raises(UsageError, match="400 pieces but the checkpoint's vocabulary has 512"):
        convert_llama2c(MODEL_BIN, smaller, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_directory(converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UsageError, match="--overwrite"):
        convert_llama2c(MODEL_BIN, TOKENIZER_MODEL, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    assert convert_llama2c(MODEL_BIN, TOKENIZER_MODEL, out, overwrite=True) == out
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in converted.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or backup directory left


def test_failure_while_writing_leaves_output_untouched(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")

    def broken_check(*args):
        raise RuntimeError("simulated failure after writing")

    monkeypatch.setattr(convert_module, "_check_saved_tokenizer", broken_check)
    with pytest.raises(RuntimeError, match="simulated"):
        convert_llama2c(MODEL_BIN, TOKENIZER_MODEL, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
