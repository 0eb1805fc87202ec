"""End-to-end batch-1 decoding of quantized sparse exports against llama.cpp at the same bit width.

    pip install gguf llama-cpp-python        # benchmark only: llama-cpp-python compiles llama.cpp (~5 min here)
    python bench/decode_vs_llamacpp.py       # TinyLlama-1.1B shapes, 22 layers, vocabulary 512

One random-weight Llama of TinyLlama-1.1B's shapes (hidden 2048, FFN 5632, 32 heads, 4 KV heads; the 512-token
stories260K vocabulary, so the output layer is small as in the issue's measurement) is

* exported by the real exporter code for each of int8 and int4 (MoEfied into 32-neuron experts, centroid
  routers, thresholds calibrated on random tokens: speed does not depend on what the routers learned; quantized
  in memory and written as compressed-tensors, as ``lte export --quantize``), loaded back with
  ``trust_remote_code=True`` in ``--dtype`` and decoded greedily with transformers' eager ``generate`` at each
  sparsity (``config.lte_thresholds`` set to the thresholds calibrated for it);
* written to GGUF from the same float weights with gguf-py (``GGUFWriter``, ``gguf.quants`` Q8_0 / Q4_0 for
  every Linear weight, token embeddings and the output layer in F32 as the export keeps them float), loaded by
  llama.cpp through ``llama-cpp-python`` (mmap, warm) and decoded greedily token by token (``Llama.eval``).

Both sides: the same thread count, 8 prompt tokens fed as ids, ``--new-tokens`` decoded, medians over
``--repeats`` after a warm-up. On our side a decode step reads integer rows through the CPU kernel in every
quantized layer (the routed FFNs' selected experts; attention's every row, ``QuantizedDense``); the output layer
runs its float weight (kept float, as the export keeps it); the JSON names them.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from lte.export.exporter import base_architecture, quantize_in_memory, to_routed, write_checkpoint
from lte.export.quantize import compress_checkpoint
from lte.export.thresholds import calibrate
from lte.model.inject import LTEModelConfig, inject_lte, set_lte_routing
from lte.tools.bench import machine, median_seconds, write_json

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "assets" / "stories260K"
RESULTS = REPO / "bench" / "results"
QTYPES = {"int8": "Q8_0", "int4": "Q4_0"}


def random_llama(args) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q/k rows (rotate-half RoPE) in the order llama.cpp's Llama expects (interleaved pairs)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_gguf(path: Path, model: transformers.LlamaForCausalLM, qtype_name: str) -> None:
    """The model's float weights as a llama.cpp GGUF, every Linear weight in ``qtype_name`` (Q8_0, Q4_0)."""
    import gguf
    from gguf.quants import quantize

    config = model.config
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype_name}"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {tokenizer.unk_token_id: gguf.TokenType.UNKNOWN, 1: gguf.TokenType.CONTROL, 2: gguf.TokenType.CONTROL}
    writer.add_tokenizer_model("llama")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_token_types(
        [
            special.get(i, gguf.TokenType.BYTE if token.startswith("<0x") else gguf.TokenType.NORMAL)
            for token, i in vocab
        ]
    )
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    for i in range(config.num_hidden_layers):
        for ours, theirs in GGUF_NAMES.items():
            weight = state[f"model.layers.{i}.{ours}.weight"]
            if weight.ndim == 1:
                writer.add_tensor(f"blk.{i}.{theirs}.weight", weight)
                continue
            if theirs in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if theirs == "attn_q" else config.num_key_value_heads
                weight = _permute(weight, heads)
            writer.add_tensor(f"blk.{i}.{theirs}.weight", quantize(weight, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llamacpp_tokens_per_s(path: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> float:
    """Greedy decode steps per second (the prompt fed first and not timed, as on our side)."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads, use_mmap=True, verbose=False)

    def decode_seconds() -> float:
        llm.reset()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return time.perf_counter() - start

    decode_seconds()  # warm-up: pages the weights in
    seconds = sorted(decode_seconds() for _ in range(repeats))[repeats // 2]
    llm.close()
    return new_tokens / seconds


def ours_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Decode steps per second of eager ``generate`` (the prefill of the prompt timed apart and taken out)."""
    kwargs = {"do_sample": False, "pad_token_id": 0}

    def run(n):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)

    total = median_seconds(run(new_tokens + 1), repeats)
    first = median_seconds(run(1), repeats)  # the prefill and the first token
    return new_tokens / (total - first)


def export_quantized(model, scheme: str, sparsities: list[float], out: Path, expert_size: int) -> dict:
    """``model`` MoEfied, quantized and exported to ``out``; returns {sparsity: thresholds}."""
    inject_lte(model, LTEModelConfig(expert_size=expert_size, router_init="centroid"), kmeans_iters=2, progress=False)
    set_lte_routing(model, "hard")
    quant = quantize_in_memory(model, scheme)
    tokens = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(1))
    layers = model.config.num_hidden_layers
    thresholds = {s: calibrate(model, [{"input_ids": tokens}], [s] * layers, progress=False) for s in sparsities}
    base = base_architecture(model)
    to_routed(model, thresholds[sparsities[0]])
    write_checkpoint(model, transformers.AutoTokenizer.from_pretrained(TOKENIZER), out, base)
    compress_checkpoint(out, model, quant)
    return thresholds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--expert-size", type=int, default=32)
    parser.add_argument("--sparsity", default="0,0.5,0.7,0.9")
    parser.add_argument("--schemes", default="int8,int4")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--work", help="where the exports and GGUF files go (default: a temporary directory)")
    parser.add_argument("--json", default=str(RESULTS / "decode_vs_llamacpp_cpu.json"))
    args = parser.parse_args()
    sparsities = [float(s) for s in args.sparsity.split(",")]
    threads = torch.get_num_threads()
    prompt = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(2))
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        for scheme in args.schemes.split(","):
            gguf_path = work / f"model-{QTYPES[scheme]}.gguf"
            model = random_llama(args)
            write_gguf(gguf_path, model, QTYPES[scheme])
            theirs = llamacpp_tokens_per_s(gguf_path, prompt[0].tolist(), args.new_tokens, args.repeats, threads)
            gguf_path.unlink()
            print(f"llama.cpp {QTYPES[scheme]}: {theirs:.2f} tokens/s", flush=True)
            out = work / f"export-{scheme}"
            thresholds = export_quantized(model, scheme, sparsities, out, args.expert_size)
            del model
            gc.collect()
            dtype = getattr(torch, args.dtype)
            exported = transformers.AutoModelForCausalLM.from_pretrained(
                out, trust_remote_code=True, dtype=dtype
            ).eval()
            routed = sum(getattr(m, "lte_qweight", None) is not None for m in exported.modules())
            for sparsity in sparsities:
                exported.config.lte_thresholds = thresholds[sparsity]
                with torch.no_grad():
                    ours = ours_tokens_per_s(exported, prompt, args.new_tokens, args.repeats)
                bits = int(scheme.removeprefix("int")) + 16 / 32
                rows.append(
                    {
                        "sparsity": sparsity,
                        "dtype": scheme,
                        "tokens_per_s": ours,
                        "llamacpp": QTYPES[scheme],
                        "llamacpp_tokens_per_s": theirs,
                        "speedup_vs_llamacpp": ours / theirs,
                        "bits_per_weight": bits,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            del exported
            gc.collect()
    write_json(
        {
            "device": machine(),
            "model": f"random Llama, hidden {args.hidden}, FFN {args.intermediate}, {args.layers} layers, vocab 512",
            "ours": f"transformers eager generate, trust_remote_code, {args.dtype} activations (rounded to int8 "
            f"blocks of 32 inside the CPU kernel); {routed} Linear "
            f"layers decode from their integer rows through the CPU kernel (routed FFNs: the selected experts; "
            f"attention: every row); the output layer runs its {args.dtype} weight (torch)",
            "llamacpp": "llama-cpp-python, every Linear weight quantized, token embeddings and output layer F32, "
            "decode steps timed apart from the prompt",
            "threads": threads,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "rows": rows,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
