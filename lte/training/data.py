"""Training and held-out data through the ``datasets`` library.

Sources are local files (``.txt`` split into documents by line/paragraph/whole file,
``.json``/``.jsonl``, ``.csv``, ``.parquet``) or hub dataset names. Two formats:

* ``text``: documents are tokenised, concatenated and cut into ``block_size`` blocks
  (causal-LM packing, as ``run_clm`` does); every token is a label.
* ``instruction``: alpaca-style records (instruction, optional input, output), turned into TRL's
  conversational prompt-completion form and tokenised the way TRL's ``SFTTrainer`` does it:
  the prompt through the chat template with the generation prompt, prompt + completion through
  the template, the loss on the completion only (from where the two token sequences diverge,
  TRL's ``common_prefix_length``), batches padded by TRL's ``DataCollatorForLanguageModeling``.
  A tokenizer without a chat template gets the Alpaca template (:data:`ALPACA_CHAT_TEMPLATE`),
  which is saved with every stage model and the export, so the trained model is prompted the
  way it was trained: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from datasets import Dataset, Value, concatenate_datasets, load_dataset

from ..core.errors import UsageError
from ..core.record import split_sources
from .config import DataArgs

logger = logging.getLogger("lte")

_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# The Stanford Alpaca prompt as a chat template (a record's input, when present, follows its instruction in the
# user turn, not under a separate "### Input:" header); the assistant turn ends with EOS so the model learns to stop.
ALPACA_CHAT_TEMPLATE = (
    "{{ bos_token }}Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in _BUILDERS or source.count("/") > 1


def check_source(spec: str, key: str) -> None:
    """Fail early, before anything is written, when a local data file is missing."""
    sources = split_sources(spec)
    for source in sources:
        if _looks_like_path(source) and not Path(source).expanduser().exists():
            which = "file not found" if len(sources) == 1 else f"file {source} not found"
            raise UsageError(f"{key}={spec}: {which}; give an existing file or a hub dataset name")


_TEXT_BUILDERS = ("text", "json", "csv")
_SNIFF_BYTES = 1 << 16
JSON_HINT = 'one JSON object per line (.jsonl) or a JSON list of objects (.json), each with a string "text" field'


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause of a wrapped error (``datasets`` wraps the decoder's in DatasetGenerationError)."""
    seen = set()
    while id(exc) not in seen and (exc.__cause__ or exc.__context__) is not None:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc


def unreadable_data(source: str, exc: BaseException, what: str = "data") -> UsageError:
    """One message for a data file that does not decode or parse, naming the file and the fix."""
    root = _root_cause(exc)
    detail = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    if isinstance(root, UnicodeDecodeError):
        return UsageError(
            f"{source} is not UTF-8 text (byte {root.start}: {root.reason}); convert it to UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8 {source} > fixed{Path(source).suffix}) or give another file"
        )
    if isinstance(root, OSError):
        return UsageError(f"cannot read {source}: {root.strerror or detail}; check the path and its permissions")
    if Path(source).suffix.lower() in (".json", ".jsonl"):
        return UsageError(f"{source} is not valid JSON ({detail}); fix the file: {JSON_HINT}")
    return UsageError(f"{source} could not be read as {what} ({detail}); check that its content matches its extension")


def _sniff_binary(path: Path, source: str) -> None:
    """A text-format file with NUL bytes is binary (an archive, a model, a wrong path)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError as exc:
        raise unreadable_data(source, exc) from None
    if b"\0" in head:
        raise UsageError(f"{source} is a binary file, not text; give a UTF-8 text, JSON Lines, CSV or Parquet file")


def read_text_file(path: str | Path, key: str) -> str:
    """The whole of a UTF-8 text file (``lte compare``/``lte analyze`` data); an unreadable, binary
    or empty file is one message naming ``key`` and the file."""
    source = str(path)
    _sniff_binary(Path(path), f"{key} {source}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise UsageError(f"{key}: {unreadable_data(source, exc)}") from None
    if not text.strip():
        raise UsageError(f"{key} {source} holds no text (empty or whitespace only); give a file with text")
    return text


def load_documents(spec: str, split: str, args: DataArgs) -> Dataset:
    """The documents of one source, or of several separated by commas, concatenated in that order."""
    parts = [_load_source(source, split, args) for source in split_sources(spec)]
    if len(parts) == 1:
        return parts[0]
    shared = [c for c in parts[0].column_names if all(c in p.column_names for p in parts[1:])]
    try:
        return concatenate_datasets([p.select_columns(shared) for p in parts])
    except ValueError as exc:
        raise UsageError(f"cannot concatenate the sources of {spec}: {str(exc).splitlines()[0]}") from None


def _load_source(source: str, split: str, args: DataArgs) -> Dataset:
    path = Path(source).expanduser()
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UsageError(f"{source}: unsupported file type {path.suffix!r}; use one of {', '.join(_BUILDERS)}")
        kwargs = {"sample_by": args.sample_by} if builder == "text" else {}
        if builder in _TEXT_BUILDERS:
            _sniff_binary(path, source)
        json_log = logging.getLogger("datasets.packaged_modules.json.json")  # logs the error it then raises
        level = json_log.level
        json_log.setLevel(logging.CRITICAL)
        try:
            dataset = load_dataset(builder, data_files={"data": str(path)}, split="data", **kwargs)
        except Exception as exc:  # the builders raise many kinds (decode, Arrow, JSON); all mean "bad file"
            raise unreadable_data(source, exc, f"{builder} data") from None
        finally:
            json_log.setLevel(level)
        if len(dataset) == 0:
            raise UsageError(f"{source} holds no documents (the file is empty); give a file with text")
    else:
        check_source(source, "data")  # a hub name, or a local dataset directory (same loader)
        try:
            dataset = load_dataset(source, args.name, split=split)
        except Exception as exc:  # the hub raises many kinds; all mean "cannot get this dataset"
            raise UsageError(f"could not load dataset {source!r} (split {split!r}): {exc}") from None
    return dataset


def _require_strings(dataset: Dataset, fields, source: str) -> None:
    """Each of ``fields`` is a string column (a number or a list where text belongs is the user's to fix)."""
    for name in fields:
        feature = dataset.features.get(name)
        if name in dataset.column_names and not (
            isinstance(feature, Value) and feature.dtype in ("string", "large_string")
        ):
            kind = feature.dtype if isinstance(feature, Value) else type(feature).__name__
            raise UsageError(
                f"{source}: column {name!r} holds {kind} values, not text; make every {name!r} a string "
                f"(or point the data.*_field setting at the text column)"
            )


def _text_column(dataset: Dataset, field_name: str, source: str) -> Dataset:
    if field_name not in dataset.column_names:
        raise UsageError(
            f"{source} has no {field_name!r} column (columns: {dataset.column_names}); set data.text_field"
        )
    _require_strings(dataset, [field_name], source)
    texts = dataset.filter(lambda row: bool(row[field_name] and row[field_name].strip()))
    if len(texts) == 0:
        raise UsageError(f"{source} holds no text (every {field_name!r} is empty or whitespace); give a file with text")
    return texts


def document_markers(tokenizer) -> tuple[list[int], list[int]]:
    """The tokens that open and close a document, as the tokenizer defines them.

    The opening marker is whatever the tokenizer adds itself (Llama's, Mistral's, Gemma's BOS; OPT's
    ``</s>``; nothing for GPT-2 or Qwen). Every document is closed by EOS, so the model and its routers
    see the token a client puts at a document's end and what follows it; the one exception is a
    tokenizer whose opening marker *is* EOS (OPT), where the next document's opening already separates.
    """
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    at = next((i for i in range(len(probe) - len(bare) + 1) if probe[i : i + len(bare)] == bare), len(probe))
    start, added_end = probe[:at], probe[at + len(bare) :]
    eos = tokenizer.eos_token_id
    end = added_end or ([] if eos is None or start == [eos] else [eos])
    return start, end


def document_ids(tokenizer, texts: list[str], unmarked: float = 0.0) -> list[list[int]]:
    """Each text as one document: its opening marker, its tokens and its closing marker. A share
    ``unmarked`` of the documents (chosen by a hash of the text, so the same on every run and
    process) goes without its opening marker: packed, those follow the previous document's EOS
    directly, as text does when a client feeds one document after another without BOS."""
    start, end = document_markers(tokenizer)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [
        (start if zlib.crc32(text.encode()) % 10_000 >= unmarked * 10_000 else []) + tokens + end
        for text, tokens in zip(texts, ids, strict=True)
    ]


def pack(
    dataset: Dataset,
    tokenizer,
    args: DataArgs,
    max_tokens: int | None,
    block: int | None = None,
    source: str | None = None,
    unmarked: float = 0.0,
) -> Dataset:
    """Tokenise documents, each with its start and end markers (:func:`document_markers`), and cut
    the concatenation into blocks of ``block`` tokens (default ``block_size``); ``source`` names the
    data in messages (default ``data.train``)."""
    field_name = args.text_field
    dataset = _text_column(dataset, field_name, source or args.train)
    tokens = dataset.map(
        lambda batch: {"ids": document_ids(tokenizer, batch[field_name], unmarked)},
        batched=True,
        remove_columns=dataset.column_names,
        desc="Tokenizing",
    )
    block = block or args.block_size
    limit = None if max_tokens is None else max_tokens // block

    def group(batch):
        flat = [t for seq in batch["ids"] for t in seq]
        n = len(flat) // block
        blocks = [flat[i * block : (i + 1) * block] for i in range(n)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    packed = tokens.map(group, batched=True, batch_size=10_000, remove_columns=["ids"], desc="Packing")
    if len(packed) == 0:
        raise UsageError(
            f"the data has fewer than one block ({block} tokens); give more text or smaller blocks "
            f"(data.block_size; data.eval_block_size for held-out text)"
        )
    if limit is not None:
        packed = packed.select(range(min(limit, len(packed))))
    return packed


# How a client may feed documents: each on its own after BOS, each on its own after an EOS (the
# turn after an end of sequence), or packed one after another with EOS between them.
LAYOUTS = {"bos": "<s> doc", "eos": "</s> doc", "packed": "<s> A </s> B ..."}
MIN_LAYOUT_DOCUMENTS = 16  # fewer, and the layouts' perplexities are a few documents' (a warning says so)


def layout_rows(docs: list[list[int]], layout: str, tokenizer, block: int) -> list[dict]:
    """Held-out documents (bare token ids) in one of :data:`LAYOUTS`, as rows of at most ``block`` tokens.

    Only document tokens are labels, each document is cut to ``block - 2`` tokens, and a packed row
    holds whole documents: every layout scores exactly the same tokens, so their perplexities differ
    only by what precedes each document. The markers are the tokenizer's (BOS, or EOS where it has none).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    first = {"bos": bos, "eos": eos, "packed": bos}[layout]
    docs = [d[: block - 2] for d in docs if d]
    rows, ids, labels = [], [], []

    def close():
        if ids:
            rows.append({"input_ids": list(ids), "labels": list(labels)})
            ids.clear(), labels.clear()

    for doc in docs:
        if layout != "packed" or len(ids) + len(doc) + 1 > block:
            close()
        marker = first if not ids else eos
        markers = [] if marker is None else [marker]
        ids.extend(markers + doc)
        labels.extend([-100] * len(markers) + doc)
    close()
    return rows


def layout_datasets(docs: Dataset, tokenizer, args: DataArgs, max_tokens: int | None) -> dict[str, Dataset]:
    """The held-out documents in every layout of :data:`LAYOUTS` (rows of at most ``held_out_block_size``)."""
    field_name = args.text_field
    docs = _text_column(docs, field_name, args.eval or args.train)
    bare = [ids for ids in tokenizer(list(docs[field_name]), add_special_tokens=False)["input_ids"] if ids]
    available = len(bare)
    if max_tokens is not None:
        total, keep = 0, 0
        while keep < len(bare) and total < max_tokens:
            total += len(bare[keep])
            keep += 1
        bare = bare[:keep]
    if len(bare) < MIN_LAYOUT_DOCUMENTS:
        if len(bare) < available:
            fix = "raise data.max_eval_tokens"
        elif args.eval and (args.layout_sample_by or args.sample_by) == "document":
            fix = "set data.layout_sample_by=paragraph (a document per blank-line-separated paragraph) or line"
        else:
            fix = "give more held-out documents"
        logger.warning(
            "the held-out layouts have %d document(s) from %s (%d tokens once each is cut to a block): too few "
            "to tell the layouts apart; %s",
            len(bare),
            args.eval or args.train,
            sum(min(len(ids), args.held_out_block_size - 2) for ids in bare),
            fix,
        )
    return {
        layout: Dataset.from_list(layout_rows(bare, layout, tokenizer, args.held_out_block_size)) for layout in LAYOUTS
    }


def to_conversation(record: dict, args: DataArgs) -> dict:
    """One alpaca-style record as TRL's conversational prompt-completion example."""
    instruction = record[args.instruction_field]
    context = (record.get(args.input_field) or "").strip()
    user = instruction if not context else f"{instruction}\n\n{context}"
    return {
        "prompt": [{"role": "user", "content": user}],
        "completion": [{"role": "assistant", "content": record[args.response_field]}],
    }


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the Alpaca one (kept when the tokenizer is saved)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = ALPACA_CHAT_TEMPLATE


def _chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def encode_conversation(example: dict, tokenizer, max_length: int) -> dict:
    """input_ids, attention_mask and completion-only labels, as TRL's SFT tokenisation builds them."""
    from trl.data_utils import common_prefix_length

    prompt_ids = _chat_ids(tokenizer, example["prompt"], add_generation_prompt=True)
    ids = _chat_ids(tokenizer, example["prompt"] + example["completion"])
    start = common_prefix_length(prompt_ids, ids)
    ids = ids[:max_length]
    labels = ([-100] * start + ids[start:])[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def instruction_examples(
    dataset: Dataset, tokenizer, args: DataArgs, max_tokens: int | None, max_length: int | None = None
) -> Dataset:
    """Chat-formatted examples of at most ``max_length`` tokens (default ``block_size``), loss on responses."""
    max_length = max_length or args.block_size
    for key in (args.instruction_field, args.response_field):
        if key not in dataset.column_names:
            raise UsageError(
                f"instruction data needs a {key!r} column (columns: {dataset.column_names}); "
                f"set data.instruction_field / data.response_field"
            )
    _require_strings(dataset, [args.instruction_field, args.input_field, args.response_field], "instruction data")
    ensure_chat_template(tokenizer)
    examples = dataset.map(
        lambda record: encode_conversation(to_conversation(record, args), tokenizer, max_length),
        remove_columns=dataset.column_names,
        desc="Tokenizing",
    )
    kept = examples.filter(lambda r: any(label != -100 for label in r["labels"]))
    if len(kept) == 0:
        raise UsageError(
            f"every one of the {len(examples)} instruction examples has a prompt that fills all {max_length} "
            "tokens: raise data.block_size (data.eval_block_size for held-out examples)"
        )
    if len(kept) < len(examples):
        logger.warning(
            "%d of %d instruction examples dropped: their prompt fills all %d tokens "
            "(data.block_size; data.eval_block_size for held-out examples)",
            len(examples) - len(kept),
            len(examples),
            max_length,
        )
    examples = kept
    if max_tokens is not None:
        lengths = [len(x) for x in examples["input_ids"]]
        total, keep = 0, 0
        while keep < len(lengths) and total + lengths[keep] <= max_tokens:
            total += lengths[keep]
            keep += 1
        examples = examples.select(range(max(keep, 1)))
    return examples


@dataclass
class LMData:
    train: Dataset
    eval: Dataset
    padded: bool  # instruction data has variable lengths and needs a padding collator
    layouts: dict[str, Dataset] = field(default_factory=dict)  # held-out documents per layout (text data)


def build_data(args: DataArgs, tokenizer, seed: int) -> LMData:
    """Load, split and tokenise the training and held-out data."""
    train_docs = load_documents(args.train, args.train_split, args)
    if args.eval:
        eval_docs = load_documents(args.eval, args.eval_split, args)
    else:
        try:
            split = train_docs.train_test_split(test_size=args.eval_fraction, seed=seed)
        except ValueError:  # too few documents to hold any out and keep any
            raise UsageError(
                f"data.train={args.train} has {len(train_docs)} document(s): too few to hold out "
                f"data.eval_fraction={args.eval_fraction} of them; set data.eval=FILE (held-out text), "
                f"or give more documents (data.sample_by=paragraph splits a .txt at blank lines)"
            ) from None
        train_docs, eval_docs = split["train"], split["test"]
    if args.format == "text":
        layout_docs = eval_docs
        if args.eval and args.layout_sample_by and args.layout_sample_by != args.sample_by:
            layout_docs = load_documents(args.eval, args.eval_split, replace(args, sample_by=args.layout_sample_by))
        return LMData(
            pack(train_docs, tokenizer, args, args.max_train_tokens, unmarked=args.unmarked_fraction),
            pack(
                eval_docs,
                tokenizer,
                args,
                args.max_eval_tokens,
                args.held_out_block_size,
                source=args.eval or f"the held-out share of {args.train}",
            ),
            padded=False,
            layouts=layout_datasets(layout_docs, tokenizer, args, args.max_eval_tokens),
        )
    return LMData(
        instruction_examples(train_docs, tokenizer, args, args.max_train_tokens),
        instruction_examples(eval_docs, tokenizer, args, args.max_eval_tokens, args.held_out_block_size),
        padded=True,
    )
