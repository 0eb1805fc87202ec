"""Client checks on exported checkpoints, run by tests/export/test_export_clients.py as
``python -I tests/export_clients.py CHECK DIR...`` from a temporary directory: what a user of
the export has, without the project (``lte`` and ``lte_kernels`` cannot be imported). Each
check prints ``RESULT <json>``; the test asserts on the numbers."""

import copy
import importlib.abc
import json
import sys
from pathlib import Path


class _NoProject(importlib.abc.MetaPathFinder):
    """The project is installed (editable) in this environment; a user of the export has no copy."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lte", "lte_kernels"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a client of the export)")
        return None


sys.meta_path.insert(0, _NoProject())
try:
    import lte  # noqa: F401
except ImportError:
    PROJECT_IMPORTABLE = False
else:
    PROJECT_IMPORTABLE = True

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _tensor_names(files) -> list[str]:
    from safetensors import safe_open

    names = set()
    for file in files:
        with safe_open(str(file), "pt") as f:
            names |= set(f.keys())
    return sorted(names)


def load_sparse(directory):
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()


def base_class(directories):
    """The export loaded by the base class and by AutoModelForCausalLM without remote code: the
    dense model, every weight used (the routers are in their own file); its tokenizer without remote code."""
    out = {}
    for directory in directories:
        d = torch.load(f"{directory}/expected.pt")
        config = json.loads(Path(f"{directory}/config.json").read_text())
        tokenizer_config = json.loads(Path(f"{directory}/tokenizer_config.json").read_text())
        base_cls = getattr(transformers, config["architectures"][0])
        base, info = base_cls.from_pretrained(directory, output_loading_info=True)
        auto = AutoModelForCausalLM.from_pretrained(directory)  # no trust_remote_code: no prompt (stdin is closed)
        sparse = load_sparse(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)  # likewise
        ids = d["ids"]
        with torch.no_grad():
            base_logits, auto_logits = base.eval()(ids).logits, auto.eval()(ids).logits
            sparse.config.lte_routing = "dense"
            dense_logits = sparse(ids).logits
            sparse.config.lte_routing = "hard"
            sparse_logits = sparse(ids).logits
        resaved = f"{directory}-resaved"  # save_pretrained of the sparse model: still the base checkpoint
        sparse.save_pretrained(resaved)
        again = base_cls.from_pretrained(resaved).eval()
        reloaded = load_sparse(resaved)
        with torch.no_grad():
            resaved_dense, resaved_sparse = again(ids).logits, reloaded(ids).logits
        resaved_config = json.loads(Path(f"{resaved}/config.json").read_text())
        out[directory] = {
            "resaved_vs_base": rel(resaved_dense, base_logits),
            "resaved_sparse": rel(resaved_sparse, sparse_logits),
            "resaved_architectures": resaved_config["architectures"],
            "resaved_format": resaved_config.get("lte_format_version"),
            "resaved_weight_names": _tensor_names(Path(resaved).glob("*.safetensors")),
            "resaved_router_names": _tensor_names([Path(resaved, "lte", "routers.safetensors")]),
            "weight_names": _tensor_names(Path(directory).glob("*.safetensors")),
            "router_names": _tensor_names([Path(directory, "lte", "routers.safetensors")]),
            "resaved_model_type": resaved_config["model_type"],
            "base_class": type(base).__name__,
            "auto_class": type(auto).__name__,
            "sparse_class": type(sparse).__name__,
            "missing": sorted(info["missing_keys"]),
            "unexpected": sorted(info["unexpected_keys"]),
            "mismatched": sorted(str(k) for k in info["mismatched_keys"]),
            "base_vs_dense": rel(base_logits, dense_logits),
            "auto_vs_dense": rel(auto_logits, dense_logits),
            "base_vs_original": rel(base_logits, d["dense"]),
            "sparse_vs_base": rel(sparse_logits, base_logits),
            "sparse_vs_trained": rel(sparse_logits, d["sparse"]),
            "model_type": config["model_type"],
            "use_cache": config.get("use_cache"),
            "base_use_cache": getattr(base.config, "use_cache", None),
            "tokenizer_class": type(tokenizer).__name__,
            "tokenizer_keys": sorted(tokenizer_config),
            "tokens": tokenizer("Once upon a time")["input_ids"],
        }
    return out


def peft_lora(directories):
    """PEFT all-linear LoRA on the sparse export: where the adapters go, their gradients, and
    the merged model's routing."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for directory in directories:
        d = torch.load(f"{directory}/expected.pt")
        ids = d["ids"]
        model = load_sparse(directory)
        routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
        peft_model = get_peft_model(
            model, LoraConfig(target_modules="all-linear", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=True)
        )
        adapted = sorted(
            {n.rsplit(".lora_A", 1)[0].split(".")[-1] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
        )
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        grad_norms = {}
        peft_model.train()
        for _ in range(3):
            loss = peft_model(input_ids=ids, labels=ids).loss
            loss.backward()
            for n, p in peft_model.named_parameters():
                if ".lora_B." in n:
                    grad_norms.setdefault(n.split(".lora_B")[0].split(".")[-1], []).append(float(p.grad.norm()))
            optimizer.step()
            optimizer.zero_grad()
        peft_model.eval()
        with torch.no_grad():
            unmerged = peft_model(input_ids=ids).logits
            merged_model = peft_model.merge_and_unload()
            merged = merged_model(ids).logits
            merged_model.config.lte_track_sparsity = True
            merged_model.lte_reset_sparsity()
            token = merged_model(ids[:1, :1]).logits  # one token: the kernel path, on merged weights
            sparsity = merged_model.lte_sparsity()
            masked = merged_model(ids[:1]).logits[:, :1]  # the same token in a sequence: the masked path
            merged_model.config.lte_routing = "dense"
            dense = merged_model(ids).logits
            merged_model.config.lte_routing = "hard"
        modeling = sys.modules[type(merged_model).__module__]
        routed = [
            type(m).__name__
            for m in merged_model.modules()
            if isinstance(m, (modeling.RoutedFirst, modeling.RoutedDown))
        ]
        out[directory] = {
            "adapted": adapted,
            "grad_norms": grad_norms,
            "routers_unchanged": all(
                torch.equal(routers[n], p) for n, p in merged_model.named_parameters() if n in routers
            )
            and len(routers) > 0,
            "merged_vs_unmerged": rel(merged, unmerged),
            "merged_vs_dense": rel(merged, dense),
            "token_vs_masked": rel(token, masked),
            "sparsity": sparsity,
            "routed": sorted(set(routed)),
            "routed_count": len(routed),
            "trained_vs_original": rel(merged, d["sparse"]),
        }
    return out


def gradients(directories):
    """Gradients of every parameter through the export (autograd on) against the masked path
    forced for every token count, at 1, 2, 8 and 9 tokens."""
    out = {}
    for directory in directories:
        d = torch.load(f"{directory}/expected.pt")
        model = load_sparse(directory)
        modeling = sys.modules[type(model).__module__]
        ids = d["ids"].reshape(-1)
        rows = {}
        for tokens in (1, 2, 8, 9):
            x = ids[:tokens][None]
            grads = []
            for forced_masked in (False, True):
                saved = modeling.MAX_UNION_TOKENS
                modeling.MAX_UNION_TOKENS = 0 if forced_masked else saved
                try:
                    model.zero_grad(set_to_none=True)
                    logits = model(x).logits
                    (logits.float() ** 2).mean().backward()
                finally:
                    modeling.MAX_UNION_TOKENS = saved
                grads.append({n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()})
            got, want = grads
            ffn = [
                n for n in want if any(s in n for s in ("mlp", "ffn")) and ".router." not in n and want[n] is not None
            ]
            worst = max(
                rel(got[n], want[n]) if got[n] is not None else float("inf") for n in want if want[n] is not None
            )
            with torch.no_grad():
                fast = model(x).logits  # no autograd: the kernel path
            rows[tokens] = {
                "worst": worst,
                "ffn_params": len(ffn),
                "ffn_grad_norm": sum(float(want[n].norm()) for n in ffn),
                "none_mismatch": sorted(n for n in want if (got[n] is None) != (want[n] is None)),
                "no_grad_vs_grad": rel(fast, logits.detach()),
            }
        # frozen weights and an input that needs no gradient: nothing to differentiate, the kernels run
        calls = []
        kernel = modeling._cpu_matvec_t
        modeling._cpu_matvec_t = lambda *args, calls=calls, kernel=kernel: calls.append(1) or kernel(*args)
        model.requires_grad_(False)
        frozen = model(ids[:1][None]).logits
        modeling._cpu_matvec_t = kernel
        out[directory] = {
            "cpu_kernel": bool(modeling._cpu_kernel_available and modeling._cpu_kernel_available()),
            "rows": rows,
            "frozen_kernel_calls": len(calls),
            "frozen_grad_enabled": torch.is_grad_enabled(),
            "frozen_requires_grad": frozen.requires_grad,
        }
    return out


def compiled(directories):
    """A decode step (one token, a KV cache) under torch.compile(fullgraph=True), against eager;
    torch.export of one FFN block."""
    out = {}
    for directory in directories:
        d = torch.load(f"{directory}/expected.pt")
        ids = d["ids"][:1]
        model = load_sparse(directory)
        with torch.no_grad():
            past = model(ids[:, :-1], use_cache=True).past_key_values

            def step(token, cache, model=model):
                return model(token, past_key_values=cache, use_cache=True).logits

            eager = step(ids[:, -1:], copy.deepcopy(past))
            explained = torch._dynamo.explain(step)(ids[:, -1:], copy.deepcopy(past))
            ops = sorted(
                {
                    line.split("torch.ops.")[1].split("(")[0].split(".", 1)[1]
                    for graph in explained.graphs
                    for line in graph.code.splitlines()
                    if "torch.ops.lte_" in line
                }
            )
            torch._dynamo.reset()
            fn = torch.compile(step, fullgraph=True, backend="aot_eager")  # fake implementations, functionalisation
            compiled_logits = fn(ids[:, -1:], copy.deepcopy(past))
            config = model.config
            host = model.get_submodule(config.lte_ffn["hosts"][0]["path"])
            x = torch.randn(1, 1, config.hidden_size, generator=torch.Generator().manual_seed(0))
            exported = torch.export.export(host, (x,))
            export_ops = sorted({str(n.target) for n in exported.graph.nodes if "lte_" in str(n.target)})
            export_error = rel(exported.module()(x), host(x))
        out[directory] = {
            "graph_breaks": explained.graph_break_count,
            "graphs": explained.graph_count,
            "ops": ops,
            "compiled_vs_eager": rel(compiled_logits, eager),
            "export_ops": export_ops,
            "export_error": export_error,
        }
    return out


def generate(directories):
    """Greedy generation from the export with the remote code (sparse) and with the base class (dense)."""
    out = {}
    for directory in directories:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
        runs = {}
        for name, model in (
            ("sparse", load_sparse(directory)),
            ("dense", AutoModelForCausalLM.from_pretrained(directory)),
        ):
            with torch.no_grad():
                tokens = model.eval().generate(ids, max_new_tokens=12, do_sample=False)
            runs[name] = tokens[0, ids.shape[1] :].tolist()
        out[directory] = {**runs, "sparse_class": type(load_sparse(directory)).__name__}
    return out


if __name__ == "__main__":
    check, *dirs = sys.argv[1:]
    result = {"project_importable": PROJECT_IMPORTABLE, **globals()[check](dirs)}
    print("RESULT", json.dumps(result))
