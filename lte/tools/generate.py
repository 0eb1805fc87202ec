"""``lte generate``: run an exported checkpoint the way a user would, and show what it skips.

It loads the export with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``,
generates from a prompt, and prints the text, the decoding speed and the realised FFN
sparsity per layer; ``--compare-dense`` runs the same prompt with every expert.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import UsageError
from .bench import bench_kernel, median_seconds, run_counting_skips, set_export_routing, synchronize

# The FFN `--compare-dense` also times the kernel on: a real model's (TinyLlama-1.1B), small enough to set up in
# about a second; `lte bench kernel` runs the Llama-2 shapes.
REFERENCE_SHAPE = ("2048x5632", "TinyLlama-1.1B")


@dataclass
class Generation:
    routing: str  # "hard" (the export's routing) or "dense" (every expert)
    text: str
    new_tokens: int
    seconds: float
    per_layer_sparsity: list[float]
    note: str = ""  # e.g. that generation stopped at the end of the model's context

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def load_export(directory: str | Path, dtype: str = "auto", device: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UsageError(
            f"{directory}: no exported model there (no config.json); export one with `lte export RUN_DIR ...`"
        )
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=dtype)
    if not hasattr(model, "lte_sparsity"):
        raise UsageError(
            f"{directory} is not an LTE export (model class {type(model).__name__}); "
            f"export a trained run with `lte export RUN_DIR --target-sparsity S --out DIR`"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def generate(
    model, tokenizer, prompt: str, max_new_tokens: int, routing: str = "hard", temperature: float = 0.0, seed: int = 0
) -> Generation:
    """Generate with every layer routed ``routing`` ("hard" or "dense"); counts the skipped neurons."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    max_new_tokens, note = fit_to_context(model.config, inputs["input_ids"].shape[1], max_new_tokens)
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    kwargs.update({"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False})
    previous = set_export_routing(model.config, routing)
    model.generate(
        **inputs, **{**kwargs, "max_new_tokens": min(2, max_new_tokens)}
    )  # warm-up: first-call allocations are not speed
    torch.manual_seed(seed)
    synchronize(device)
    start = time.perf_counter()
    output, per_layer = run_counting_skips(model, lambda: model.generate(**inputs, **kwargs))
    synchronize(device)
    seconds = time.perf_counter() - start
    set_export_routing(model.config, previous)
    new = output[0, inputs["input_ids"].shape[1] :]
    return Generation(
        routing, tokenizer.decode(output[0], skip_special_tokens=True), len(new), seconds, per_layer, note
    )


def fit_to_context(config, prompt_tokens: int, max_new_tokens: int) -> tuple[int, str]:
    """``max_new_tokens`` cut to what the model's context (``max_position_embeddings``) leaves after
    the prompt, with a note when cut: past it the position embeddings are ones it never saw."""
    context = getattr(config, "max_position_embeddings", None)
    if not context:
        return max_new_tokens, ""
    if prompt_tokens >= context:
        raise UsageError(
            f"--prompt is {prompt_tokens} tokens, the model's whole context of {context}; give a shorter prompt"
        )
    room = context - prompt_tokens
    if max_new_tokens <= room:
        return max_new_tokens, ""
    return room, (
        f"note: --max-new-tokens {max_new_tokens} runs past the model's context of {context} tokens; "
        f"stopped after {room} new tokens (prompt {prompt_tokens} + {room} = {context})"
    )


def describe(result: Generation) -> str:
    mean = sum(result.per_layer_sparsity) / max(len(result.per_layer_sparsity), 1)
    per_layer = " ".join(f"{100 * s:.0f}%" for s in result.per_layer_sparsity)
    label = "LTE (sparse)" if result.routing == "hard" else "dense (every expert)"
    return (
        f"--- {label} ---\n{result.text}\n"
        f"[{result.new_tokens} new tokens in {result.seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s; "
        f"FFN sparsity {100 * mean:.1f}% (per layer: {per_layer})]" + (f"\n{result.note}" if result.note else "")
    )


@torch.no_grad()
def speed_notes(model, sparse: Generation, dense: Generation, repeats: int = 5) -> list[str]:
    """What ``--compare-dense``'s speed ratio means: one FFN's time per token dense and routed against
    the whole token's (measured here), and the kernel on a real model's FFN at the sparsity just
    measured (:func:`lte.tools.bench.bench_kernel`, the code of ``lte bench kernel``; CPU only)."""
    host = model.config.lte_ffn["hosts"][0]
    first = model.get_submodule(f"{host['path']}.{host['first'][0]}").weight
    ffn, hidden = first.shape[0] // host.get("fused_chunks", 1), first.shape[1]
    mlp, layers = model.get_submodule(host["path"]), len(model.config.lte_ffn["hosts"])
    x = torch.randn(1, 1, hidden, dtype=first.dtype, device=first.device)
    ffn_ms = {}
    for routing in ("dense", "hard"):
        previous = set_export_routing(model.config, routing)
        ffn_ms[routing] = 1e3 * median_seconds(lambda: mlp(x), 4 * repeats, first.device)
        set_export_routing(model.config, previous)
    token_ms = 1e3 / dense.tokens_per_second
    share = layers * ffn_ms["dense"] / token_ms
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(first.dtype)
    sparsity = round(sum(sparse.per_layer_sparsity) / max(len(sparse.per_layer_sparsity), 1), 2)
    lines = [
        (
            f"why: one {hidden}x{ffn} FFN takes {ffn_ms['dense']:.3f} ms dense and {ffn_ms['hard']:.3f} ms routed "
            f"(router, expert selection, kernel calls: costs per layer that do not shrink with sparsity); the "
            f"{layers} FFNs are {100 * share:.1f}% of the dense model's {token_ms:.1f} ms per token, so skipping "
            f"{100 * sparsity:.0f}% of their neurons can save at most {100 * share * sparsity:.1f}% of it"
        )
    ]
    if first.device.type == "cpu" and dtype and 0 <= sparsity < 1:
        shape, name = REFERENCE_SHAPE
        try:  # the export runs without the C++ kernel (pure-torch path); this figure then says so
            row = bench_kernel([shape], [sparsity], dtype, repeats=repeats, progress=False)[0]
        except UsageError as error:
            return [*lines, f"a real model's FFN: not measured ({error})"]
        lines.append(
            f"a real model's FFN: the same kernel on {name}'s {shape}, {dtype}, batch 1, {100 * sparsity:.0f}% of "
            f"experts skipped: {row.speedup:.2f}x the dense FFN ({row.dense_ms:.1f} -> {row.sparse_ms:.1f} ms, "
            f"median of {repeats}, {torch.get_num_threads()} threads; "
            f"full benchmark: lte bench kernel --sparsity {sparsity})"
        )
    return lines
