"""Data loading, packing and the instruction format, on local files."""

import json
import logging

import pytest
import torch
from transformers import AutoTokenizer

from conftest import STORIES, TEST_DATA
from lte.core.errors import UsageError
from lte.training.config import DataArgs
from lte.training.data import (
    ALPACA_CHAT_TEMPLATE,
    build_data,
    check_source,
    encode_conversation,
    load_documents,
    to_conversation,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STORIES)


def write_stories(path, n=40):
    stories = [f"Once upon a time there was a cat number {i}. It liked milk and naps in the sun." for i in range(n)]
    path.write_text("\n".join(json.dumps({"text": s}) for s in stories) + "\n")
    return stories


def test_jsonl_is_packed_into_full_blocks_with_labels(tmp_path, tokenizer):
    write_stories(tmp_path / "train.jsonl")
    data = build_data(
        DataArgs(train=str(tmp_path / "train.jsonl"), block_size=32, eval_fraction=0.25), tokenizer, seed=0
    )
    assert not data.padded
    assert len(data.train) > 0 and len(data.eval) > 0
    for row in data.train:
        assert len(row["input_ids"]) == 32 and row["labels"] == row["input_ids"]
    # Every document opens with the tokenizer's BOS and closes with EOS: <s> A </s> <s> B </s> ...
    first = data.train[0]["input_ids"] + data.train[1]["input_ids"]
    end = first.index(tokenizer.eos_token_id)
    assert first[0] == tokenizer.bos_token_id and first[end + 1] == tokenizer.bos_token_id
    story = tokenizer.decode(first[1:end])
    assert story.startswith("Once upon a time") and story.endswith("naps in the sun.")


def test_text_file_documents_and_token_budget(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("One story here.\n\nAnother story there.\n\n" * 50)
    args = DataArgs(train=str(tmp_path / "a.txt"), eval=str(tmp_path / "a.txt"), block_size=16, max_train_tokens=64)
    data = build_data(args, tokenizer, seed=0)
    assert len(data.train) == 4  # 64 tokens / 16 per block
    assert len(data.eval) > 4


def test_held_out_blocks_can_be_longer_than_training_blocks(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("One story here.\n\nAnother story there.\n\n" * 50)
    args = DataArgs(train=str(tmp_path / "a.txt"), eval=str(tmp_path / "a.txt"), block_size=16, eval_block_size=64)
    data = build_data(args, tokenizer, seed=0)
    assert {len(row["input_ids"]) for row in data.train} == {16}
    assert {len(row["input_ids"]) for row in data.eval} == {64}
    # the same tokens, cut differently
    assert data.eval[0]["input_ids"] == [t for row in data.train.select(range(4)) for t in row["input_ids"]]
    with pytest.raises(UsageError, match="max_eval_tokens=32 must be at least one block \\(64 tokens\\)"):
        DataArgs(train="x", block_size=16, eval_block_size=64, max_eval_tokens=32).validate()


def test_local_dataset_directory_goes_through_the_hub_loader(tmp_path, tokenizer):
    (tmp_path / "ds").mkdir()
    write_stories(tmp_path / "ds" / "train.jsonl")
    write_stories(tmp_path / "ds" / "validation.jsonl", n=10)
    data = build_data(DataArgs(train=str(tmp_path / "ds"), eval=str(tmp_path / "ds"), block_size=16), tokenizer, seed=0)
    assert len(data.train) > len(data.eval) > 0


def test_alpaca_records_train_on_the_response_only(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(STORIES)  # gets the Alpaca chat template: a fresh copy
    path = TEST_DATA / "alpaca"
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
    assert files, f"no alpaca records in {path}"
    data = build_data(
        DataArgs(train=str(files[0]), format="instruction", block_size=256, max_train_tokens=4096), tokenizer, seed=0
    )
    assert data.padded and tokenizer.chat_template == ALPACA_CHAT_TEMPLATE
    short = 0
    for row in data.train:
        labels, ids = row["labels"], row["input_ids"]
        start = labels.index(next(label for label in labels if label != -100))
        assert start > 0 and all(label == -100 for label in labels[:start])
        assert labels[start:] == ids[start:]
        prompt = tokenizer.decode(ids[:start])
        assert "### Instruction:" in prompt and prompt.endswith("### Response:\n")
        if len(ids) < 256:  # not truncated: the answer ends with EOS, so the model learns to stop
            short += 1
            assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert short > 0


def test_instruction_blocks_too_short_for_any_prompt_are_a_usage_error():
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    args = DataArgs(train=str(TEST_DATA / "alpaca" / "alpaca_data_500.json"), format="instruction", block_size=16)
    with pytest.raises(UsageError, match="every one of the 475 instruction examples has a prompt that fills all 16"):
        build_data(args, tokenizer, seed=0)  # 475: 5% of the 500 are held out


def test_conversations_are_tokenized_as_trl_does_with_the_tokenizers_own_template(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    example = to_conversation(
        {"instruction": "Name a color.", "input": "Pick one.", "output": "Blue."}, DataArgs(train="x")
    )
    assert example["prompt"] == [{"role": "user", "content": "Name a color.\n\nPick one."}]
    row = encode_conversation(example, tokenizer, max_length=512)
    start = row["labels"].count(-100)
    assert tokenizer.decode(row["input_ids"][:start]) == "<|user|>Name a color.\n\nPick one.\n<|assistant|>"
    assert tokenizer.decode(row["input_ids"][start:]) == "Blue.\n"  # the loss is on the answer only
    assert row["labels"][start:] == row["input_ids"][start:] and len(row["attention_mask"]) == len(row["input_ids"])
    short = encode_conversation(example, tokenizer, max_length=5)
    assert len(short["input_ids"]) == len(short["labels"]) == 5


def test_missing_column_is_a_usage_error(tmp_path, tokenizer):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(UsageError, match="no 'text' column"):
        build_data(
            DataArgs(train=str(tmp_path / "d.jsonl"), eval=str(tmp_path / "d.jsonl"), block_size=4), tokenizer, 0
        )


def test_several_sources_separated_by_commas_are_concatenated(tmp_path, tokenizer):
    write_stories(tmp_path / "a.jsonl", n=20)
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": f"A dog named Rex {i}.", "id": i}) for i in range(30))
    )
    (tmp_path / "c.txt").write_text("A bird sang.\n\nThe end.\n\n" * 10)
    both = DataArgs(
        train=f"{tmp_path / 'a.jsonl'}, {tmp_path / 'b.jsonl'},{tmp_path / 'c.txt'}",
        eval=str(tmp_path / "a.jsonl"),
        block_size=16,
    )
    one = DataArgs(train=str(tmp_path / "a.jsonl"), eval=str(tmp_path / "a.jsonl"), block_size=16)
    docs = load_documents(both.train, "train", both)
    assert len(docs) == 20 + 30 + 20 and docs.column_names == ["text"]  # the extra "id" column is dropped
    assert docs[20]["text"] == "A dog named Rex 0." and docs[50]["text"] == "A bird sang."
    assert len(build_data(both, tokenizer, 0).train) > len(build_data(one, tokenizer, 0).train)
    with pytest.raises(UsageError, match=r"nope\.jsonl not found"):
        check_source(f"{tmp_path / 'a.jsonl'},{tmp_path / 'nope.jsonl'}", "data.train")


def word_tokenizer(template: str | None, bos: str, eos: str):
    """A tiny offline fast tokenizer whose post-processor adds ``template``'s markers (None: nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<eot>", "[UNK]", "a", "b", "c", "d"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        core.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
        )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token="[UNK]")


@pytest.mark.parametrize(
    ("template", "bos", "eos", "packed"),
    [
        (
            "<s> $A",
            "<s>",
            "</s>",
            "<s> a b </s> <s> c </s> <s> d </s>",
        ),  # Llama, Mistral, Gemma: BOS added, EOS appended
        (None, "<eot>", "<eot>", "a b <eot> c <eot> d <eot>"),  # GPT-2, Qwen: nothing added, EOS separates
        ("</s> $A", "</s>", "</s>", "</s> a b </s> c </s> d"),  # OPT: its opening marker is EOS already
        ("<s> $A </s>", "<s>", "</s>", "<s> a b </s> <s> c </s> <s> d </s>"),  # a tokenizer that adds both itself
    ],
)
def test_documents_are_packed_with_the_markers_the_tokenizer_defines(tmp_path, template, bos, eos, packed):
    tok = word_tokenizer(template, bos, eos)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["a b", "c", "d"]) + "\n")
    n = len(packed.split())
    data = build_data(DataArgs(train=str(tmp_path / "d.jsonl"), eval=str(tmp_path / "d.jsonl"), block_size=n), tok, 0)
    assert tok.convert_ids_to_tokens(data.eval[0]["input_ids"]) == packed.split()


def stories_eval_file(tmp_path, n: int, **data) -> tuple[list[str], DataArgs]:
    """``n`` stories as training rows and, blank-line separated, as one .txt eval file read whole."""
    stories = write_stories(tmp_path / "e.jsonl", n=n)
    (tmp_path / "e.txt").write_text("\n\n".join(stories))
    args = DataArgs(
        train=str(tmp_path / "e.jsonl"), eval=str(tmp_path / "e.txt"), sample_by="document", block_size=16, **data
    )
    return stories, args


def test_held_out_layouts_score_the_same_tokens_after_bos_after_eos_and_packed(tmp_path, tokenizer):
    from conftest import tiny_model
    from lte.training.evaluate import evaluate_layouts, pad_rows

    stories, args = stories_eval_file(tmp_path, 12, layout_sample_by="paragraph", eval_block_size=96)
    data = build_data(args, tokenizer, 0)
    whole = tokenizer("\n\n".join(stories))["input_ids"] + [tokenizer.eos_token_id]  # the file is one document
    assert [t for row in data.eval for t in row["input_ids"]] == whole[: len(whole) // 96 * 96]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    docs = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in stories]  # layout documents: paragraphs
    rows = {name: list(rows) for name, rows in data.layouts.items()}
    assert [r["input_ids"] for r in rows["bos"]] == [[bos, *d] for d in docs]
    assert [r["input_ids"] for r in rows["eos"]] == [[eos, *d] for d in docs]
    assert rows["packed"][0]["input_ids"][: len(docs[0]) + 2 + len(docs[1])] == [bos] + docs[0] + [eos] + docs[1]
    assert all(len(r["input_ids"]) <= 96 for r in rows["packed"]) and len(rows["packed"]) < len(docs)
    scored = {name: sorted(t for r in rs for t in r["labels"] if t != -100) for name, rs in rows.items()}
    assert scored["bos"] == scored["eos"] == scored["packed"] == sorted(t for d in docs for t in d)

    model = tiny_model("llama")
    model.resize_token_embeddings(len(tokenizer))
    results = evaluate_layouts(model, data.layouts, tokenizer.pad_token_id, batch_size=5)
    assert {r.tokens for r in results.values()} == {sum(len(d) for d in docs)}
    # padded, length-sorted batches give each document's own perplexity; the layouts differ by context only
    with torch.no_grad():
        nll = sum(
            float(
                torch.nn.functional.cross_entropy(
                    model(torch.tensor([[marker, *d]])).logits[0, :-1], torch.tensor(d), reduction="sum"
                )
            )
            for d in docs
            for marker in [eos]
        )
    assert results["eos"].nll == pytest.approx(nll / results["eos"].tokens, rel=1e-5)
    assert results["bos"].nll != pytest.approx(results["eos"].nll, rel=1e-6)
    assert pad_rows([{"input_ids": [5, 6], "labels": [-100, 6]}], 0)["attention_mask"].tolist() == [[1, 1]]


@pytest.mark.parametrize(("layout_sample_by", "warned"), [(None, True), ("paragraph", False)])
def test_layouts_of_a_one_document_eval_file_warn(tmp_path, tokenizer, caplog, layout_sample_by, warned):
    """A .txt eval file read whole is one document: its layouts would score one block's worth of tokens."""
    _, args = stories_eval_file(tmp_path, 20, layout_sample_by=layout_sample_by)
    with caplog.at_level(logging.WARNING, logger="lte"):
        data = build_data(args, tokenizer, 0)
    assert len(data.layouts["bos"]) == (20 if layout_sample_by else 1)
    messages = [r.getMessage() for r in caplog.records if "held-out layouts" in r.getMessage()]
    assert bool(messages) == warned
    if warned:
        assert "1 document(s)" in messages[0] and "data.layout_sample_by=paragraph" in messages[0]


def test_unmarked_share_of_documents_follows_an_eos_without_bos():
    """data.unmarked_fraction: that share of documents goes without its opening marker, chosen by
    the text (the same on every call), and none without the setting."""
    from lte.training.data import document_ids

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    texts = [f"Story {i}: Tom saw a dog." for i in range(2000)]
    marked = document_ids(tokenizer, texts)
    assert all(d[0] == tokenizer.bos_token_id and d[-1] == tokenizer.eos_token_id for d in marked)
    mixed = document_ids(tokenizer, texts, 0.25)
    share = sum(d[0] != tokenizer.bos_token_id for d in mixed) / len(mixed)
    assert 0.2 < share < 0.3
    assert mixed == document_ids(tokenizer, texts, 0.25)
    assert all(d[-1] == tokenizer.eos_token_id for d in mixed)
    assert [d[1:] if d[0] == tokenizer.bos_token_id else d for d in marked] == [
        d[1:] if d[0] == tokenizer.bos_token_id else d for d in mixed
    ]
