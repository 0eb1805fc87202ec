"""Convert a llama2.c checkpoint into a Hugging Face Llama checkpoint.

Why: the trainer loads models through transformers' Auto classes, and the smallest real pretrained
Llama there is, Karpathy's llama2.c ``stories260K`` (about 1 MB), only exists in llama2.c's own
binary format. Converted once, it gives the tests and examples a genuine model that runs in seconds
on a CPU with nothing to download.

Three things are easy to get wrong, and this module handles them:

* RoPE layout. llama2.c rotates interleaved feature pairs (2i, 2i+1); Hugging Face Llama rotates
  the two halves of each head. The rows of q_proj and k_proj are permuted to match (the same
  permutation as llama2.c's ``export.py``).
* The tokenizer. In transformers 5, ``LlamaTokenizer(vocab_file="x.model")`` encodes every text to
  empty ids, so the ``tokenizers`` pipeline is built here from the SentencePiece proto and checked
  against ``sentencepiece`` itself before anything is written.
* Partial output. Everything is written to a temporary directory beside ``out_dir`` and renamed
  into place at the end, so a failure never leaves a half-written checkpoint behind.

Only llama2.c's "legacy" (version 0) export is read: a header of 7 little-endian int32
(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), then float32 arrays.
A negative vocab_size means the output classifier is stored separately instead of being tied to the
token embedding.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UsageError

HEADER = struct.Struct("<7i")
# llama2.c's newer exports (version 1 and 2) start with this magic number instead of a header.
LLAMA2C_VERSIONED_MAGIC = 0x616B3432

# Fixed by llama2.c's model.py (its ModelArgs defaults); the file does not store them.
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0

# Texts the converted tokenizer must encode and decode exactly like sentencepiece does.
TOKENIZER_CHECK_TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "“Can I play too?” asked Tom. Mom said, ‘Yes!’",
    "She had 3 red balls and 12 blue ones.\nThe end.",
    "  Two  spaces\tand a tab, then a café 🙂 ",
]


def convert_llama2c(
    model_bin: str | os.PathLike,
    tokenizer_model: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face Llama checkpoint (model + tokenizer) converted from llama2.c files.

    ``model_bin`` is a llama2.c legacy (version 0) float32 checkpoint, ``tokenizer_model`` the
    SentencePiece ``.model`` it was trained with. Returns ``out_dir``. Raises ``UsageError`` on bad
    input, or if ``out_dir`` is a non-empty directory and ``overwrite`` is false.
    """
    model_bin, tokenizer_model, out_dir = Path(model_bin), Path(tokenizer_model), Path(out_dir)
    _check_out_dir(out_dir, overwrite)

    header, arrays = read_llama2c_checkpoint(model_bin)
    tokenizer = build_tokenizer(tokenizer_model, vocab_size=header.vocab_size, max_length=header.seq_len)
    model = build_model(header, arrays, tokenizer)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for written in staging.iterdir():
            written.chmod(0o644)  # safetensors writes its file private (0600)
        _check_saved_tokenizer(staging, tokenizer_model)
        _move_into_place(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


# --- the llama2.c checkpoint -------------------------------------------------------------------


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # always positive here; see tied_classifier
    seq_len: int
    tied_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """The float32 arrays that follow the header, in file order (Linear weights are [out, in])."""
        d, h, n, v = self.dim, self.hidden_dim, self.n_layers, self.vocab_size
        kv_dim = self.n_kv_heads * self.head_dim
        arrays = [
            ("tok_embeddings", (v, d)),
            ("attention_norm", (n, d)),
            ("wq", (n, d, d)),
            ("wk", (n, kv_dim, d)),
            ("wv", (n, kv_dim, d)),
            ("wo", (n, d, d)),
            ("ffn_norm", (n, d)),
            ("w1", (n, h, d)),
            ("w2", (n, d, h)),
            ("w3", (n, h, d)),
            ("norm", (d,)),
            ("freq_cis_real", (self.seq_len, self.head_dim // 2)),  # precomputed RoPE; not needed
            ("freq_cis_imag", (self.seq_len, self.head_dim // 2)),
        ]
        if not self.tied_classifier:
            arrays.append(("classifier", (v, d)))
        return arrays

    def file_size(self) -> int:
        return HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in self.layout())


def read_llama2c_checkpoint(path: Path) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Parse a llama2.c legacy checkpoint into its header and named float32 tensors."""
    if not path.is_file():
        raise UsageError(f"llama2.c checkpoint not found: {path}. Pass the path of the model's .bin file.")
    data = path.read_bytes()
    if len(data) < HEADER.size:
        raise UsageError(
            f"{path} is only {len(data)} bytes, too short for a llama2.c checkpoint header. "
            "Pass the model's .bin file (for example stories260K.bin)."
        )
    if struct.unpack_from("<I", data)[0] == LLAMA2C_VERSIONED_MAGIC:
        raise UsageError(
            f"{path} is a llama2.c version 1/2 export; only the legacy (version 0) format is supported. "
            "Re-export it with llama2.c's `python export.py OUT.bin --version 0 --checkpoint CKPT.pt`."
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = HEADER.unpack_from(data)
    header = Llama2cHeader(
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len, tied_classifier=vocab_size > 0
    )
    numbers = (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)
    if (
        min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len, abs(vocab_size)) <= 0
        or dim % n_heads
        or n_heads % n_kv_heads
        or header.head_dim % 2
    ):
        raise UsageError(
            f"{path} does not start with a valid llama2.c header (dim, hidden_dim, n_layers, n_heads, "
            f"n_kv_heads, vocab_size, seq_len = {numbers}). Pass a llama2.c legacy (version 0) .bin checkpoint."
        )
    if len(data) != header.file_size():
        raise UsageError(
            f"{path} is {len(data):,} bytes, but its header {numbers} implies {header.file_size():,} bytes: "
            "the file is truncated, corrupted or not a llama2.c legacy float32 checkpoint. "
            "Download or export it again."
        )

    floats = np.frombuffer(data, dtype="<f4", offset=HEADER.size)
    arrays, start = {}, 0
    for name, shape in header.layout():
        count = int(np.prod(shape))
        arrays[name] = torch.from_numpy(floats[start : start + count].astype(np.float32).reshape(shape))
        start += count
    return header, arrays


# --- the Hugging Face model --------------------------------------------------------------------


def rope_rows_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved RoPE pairs to Hugging Face's rotate-half layout.

    Within each head, llama2.c pairs rows (0,1), (2,3), ...; HF pairs row i with row i + head_dim/2.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def hf_state_dict(header: Llama2cHeader, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename llama2.c arrays to LlamaForCausalLM parameter names (dropping the RoPE tables)."""
    state = {
        "model.embed_tokens.weight": arrays["tok_embeddings"],
        "model.norm.weight": arrays["norm"],
        "lm_head.weight": arrays["tok_embeddings"] if header.tied_classifier else arrays["classifier"],
    }
    for i in range(header.n_layers):
        prefix = f"model.layers.{i}."
        state.update(
            {
                prefix + "input_layernorm.weight": arrays["attention_norm"][i],
                prefix + "self_attn.q_proj.weight": rope_rows_to_hf(arrays["wq"][i], header.n_heads),
                prefix + "self_attn.k_proj.weight": rope_rows_to_hf(arrays["wk"][i], header.n_kv_heads),
                prefix + "self_attn.v_proj.weight": arrays["wv"][i],
                prefix + "self_attn.o_proj.weight": arrays["wo"][i],
                prefix + "post_attention_layernorm.weight": arrays["ffn_norm"][i],
                prefix + "mlp.gate_proj.weight": arrays["w1"][i],
                prefix + "mlp.up_proj.weight": arrays["w3"][i],
                prefix + "mlp.down_proj.weight": arrays["w2"][i],
            }
        )
    return state


def build_model(header: Llama2cHeader, arrays: dict[str, torch.Tensor], tokenizer):
    """A float32 LlamaForCausalLM with the checkpoint's weights loaded."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_dim,
        hidden_act="silu",
        max_position_embeddings=header.seq_len,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=header.tied_classifier,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    torch.manual_seed(0)  # the random init is overwritten below; seeded only to stay deterministic
    model = LlamaForCausalLM(config)
    model.load_state_dict(hf_state_dict(header, arrays), strict=True)
    if header.tied_classifier and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("lm_head is not tied to embed_tokens after loading; transformers changed behaviour")
    # pad_token_id only in the generation config: setting it in the model config would make
    # embed_tokens treat that row as padding (no gradient).
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.eval()


# --- the tokenizer -----------------------------------------------------------------------------


def _load_sentencepiece(path: Path):
    """The SentencePiece processor and its parsed ModelProto, or UsageError if it is not one."""
    import sentencepiece as spm
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    if not path.is_file():
        raise UsageError(
            f"SentencePiece tokenizer not found: {path}. Pass the tokenizer's .model file (for example tok512.model)."
        )
    not_a_model = UsageError(
        f"{path} is not a SentencePiece model. Pass the .model file the checkpoint was trained with "
        "(for example tok512.model), not llama2.c's exported tokenizer .bin."
    )
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
        processor = spm.SentencePieceProcessor(model_file=str(path))
    except (DecodeError, RuntimeError) as error:
        raise not_a_model from error
    if not proto.pieces:
        raise not_a_model
    return processor, proto


def build_tokenizer(path: Path, *, vocab_size: int, max_length: int):
    """A fast (``tokenizers``) tokenizer equivalent to the SentencePiece BPE model at ``path``.

    It reproduces SentencePiece's encoding: strip leading/trailing spaces and collapse runs of
    spaces (remove_extra_whitespaces), prepend "▁" (add_dummy_prefix), turn spaces into "▁", then
    BPE with byte fallback. A BOS token is prepended, as llama2.c does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    processor, proto = _load_sentencepiece(path)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if len(proto.pieces) != vocab_size:
        raise UsageError(
            f"{path} has {len(proto.pieces)} pieces but the checkpoint's vocabulary has {vocab_size} tokens: "
            "this is not the tokenizer the model was trained with. Pass the matching .model file."
        )
    if spec.model_type != spec.BPE or spec.treat_whitespace_as_suffix:
        raise UsageError(
            f"{path} is not a SentencePiece BPE model with whitespace as prefix; "
            "only llama2.c-style BPE tokenizers (train_vocab) are supported."
        )
    if min(spec.unk_id, spec.bos_id, spec.eos_id) < 0:
        raise UsageError(f"{path} lacks an unk, bos or eos token; llama2.c tokenizers have all three.")

    # BPE merges, best first. SentencePiece merges the adjacent pair whose result has the highest
    # score; a merge rank ordered by that score makes `tokenizers` choose the same pair.
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    normal = [(i, p) for i, p in enumerate(proto.pieces) if p.type == p.NORMAL]
    mergeable = {p.piece for _, p in normal}
    merges = []
    for _, piece in sorted(normal, key=lambda item: (-item[1].score, item[0])):
        text = piece.piece
        merges += [(text[:k], text[k:]) for k in range(1, len(text)) if {text[:k], text[k:]} <= mergeable]

    unk = proto.pieces[spec.unk_id].piece
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback)
    )
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))  # only prepends to non-empty text
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    undo = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        undo.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(undo)
    backend.add_tokens(
        [
            AddedToken(p.piece, special=p.type != p.USER_DEFINED, normalized=False)
            for p in proto.pieces
            if p.type in (p.UNKNOWN, p.CONTROL, p.USER_DEFINED)
        ]
    )

    # Llama has no pad token. Reuse <unk> (unless the model defines one): with byte fallback it never
    # occurs in encoded text, so padding can't be mistaken for a real token. (Reusing </s> would make
    # collators that mask padding out of the labels also drop every real end-of-text label.)
    pad_id = spec.pad_id if spec.pad_id >= 0 else spec.unk_id
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=proto.pieces[spec.bos_id].piece,
        eos_token=proto.pieces[spec.eos_id].piece,
        pad_token=proto.pieces[pad_id].piece,
        add_bos_token=True,  # stored as the post-processor in tokenizer.json, which is what reloads
        add_eos_token=False,
        model_max_length=max_length,
    )
    _check_tokenizer(tokenizer, processor, path)
    return tokenizer


def _check_tokenizer(tokenizer, processor, path: Path) -> None:
    """Fail unless ``tokenizer`` encodes and decodes TOKENIZER_CHECK_TEXTS exactly like sentencepiece."""
    for text in TOKENIZER_CHECK_TEXTS:
        expected = [processor.bos_id(), *processor.encode(text)]
        ids = tokenizer(text)["input_ids"]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        if ids != expected or decoded != processor.decode(expected[1:]):
            raise RuntimeError(
                f"converted tokenizer disagrees with sentencepiece ({path}) on {text!r}: "
                f"ids {ids} vs {expected}, decoded {decoded!r}"
            )


def _check_saved_tokenizer(directory: Path, tokenizer_model: Path) -> None:
    """Reload the written tokenizer the way users will, and check it still matches sentencepiece."""
    from transformers import AutoTokenizer

    processor, _ = _load_sentencepiece(tokenizer_model)
    _check_tokenizer(AutoTokenizer.from_pretrained(directory), processor, tokenizer_model)


# --- writing the output directory --------------------------------------------------------------


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output path {out_dir} exists and is not a directory. Choose another output directory.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UsageError(
            f"output directory {out_dir} already exists and is not empty. "
            "Choose another directory, or pass --overwrite to replace it."
        )


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``staging`` directory to ``out_dir``, replacing it only if allowed."""
    _check_out_dir(out_dir, overwrite)  # again: it may have changed while we were converting
    if not out_dir.exists():
        staging.rename(out_dir)
    elif not any(out_dir.iterdir()):
        out_dir.rmdir()
        staging.rename(out_dir)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
