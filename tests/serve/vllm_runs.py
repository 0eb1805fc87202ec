"""What the vLLM tests run in a fresh interpreter of the vLLM environment (vLLM keeps process-wide
state; each run is its own process). ``python vllm_runs.py KIND JSON_ARGS`` prints ``RESULT {json}``.

* ``generate``: offline ``LLM(export)`` greedy tokens and per-step log-probabilities of PROMPTS;
* ``modules``: every routed FFN of vLLM's model (plugin applied) against the remote code's FFN on
  the same inputs, for 1 to 24 tokens (the kernel paths and the masked dense path);
* ``load``: ``LLM(export)``, expected to fail (a damaged export): the error's type and message.
"""

import json
import os
import sys

PROMPTS = ["Once upon a time", "The little dog ran to the", "Lily and Tom went", "One day, a bird saw"]
ENGINE = dict(dtype="float32", max_model_len=128, max_num_seqs=8, seed=0, kv_cache_memory_bytes=1 << 26)
TRAINING_STACK = ("lte.training", "lte.model", "peft", "trl", "datasets", "accelerate")


def is_linear(module) -> bool:
    from vllm.model_executor.layers.linear import LinearBase

    return isinstance(module, LinearBase)


def generate(args: dict) -> dict:
    from vllm import LLM, SamplingParams

    tp = args.get("tp", 1)
    llm = LLM(
        args["export"],
        enforce_eager=args.get("eager", True),
        tensor_parallel_size=tp,
        distributed_executor_backend="uni" if tp == 1 else "mp",
        **ENGINE,
    )
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=args.get("max_tokens", 12), temperature=0, logprobs=0))
    result = {
        "prompts": [list(o.prompt_token_ids) for o in outputs],
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "logprobs": [[next(iter(step.values())).logprob for step in o.outputs[0].logprobs] for o in outputs],
        "training_stack": sorted(m for m in sys.modules if m.startswith(TRAINING_STACK)),
    }
    if tp == 1:  # the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        result["class"] = type(model).__name__
        result["methods"] = sorted({type(m.quant_method).__name__ for m in model.modules() if is_linear(m)})
    return result


def modules(args: dict) -> dict:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.plugins import load_general_plugins
    from vllm.utils.torch_utils import set_default_torch_dtype

    from lte.serve.vllm_plugin import vllm_module

    load_general_plugins()
    out = {}
    for export in args["exports"]:
        config = EngineArgs(model=export, enforce_eager=True, **ENGINE).create_engine_config()
        with set_current_vllm_config(config):
            if not out:
                init_distributed_environment(1, 0, f"file://{tempfile.mktemp()}", 0, "gloo")
                ensure_model_parallel_initialized(1, 1)
            # what the CPU worker's loader does (get_model() would call torch.accelerator, absent here)
            loader = get_model_loader(config.load_config)
            with set_default_torch_dtype(config.model_config.dtype):
                model = loader.create_model(vllm_config=config, model_config=config.model_config)
                loader.load_weights(model, config.model_config)
                process_weights_after_loading(model, config.model_config, torch.device("cpu"))
        reference = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
        hidden = reference.config.hidden_size
        rows = []
        for host, threshold in zip(reference.config.lte_ffn["hosts"], reference.config.lte_thresholds, strict=True):
            ours = model.get_submodule(vllm_module(model, host["path"])[0])
            theirs = reference.get_submodule(host["path"])
            methods = sorted({type(m.quant_method).__name__ for m in ours.modules() if is_linear(m)})
            for tokens in (1, 3, 8, 24):
                x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens))
                with torch.no_grad():
                    got = ours(x)
                    want = theirs(x.unsqueeze(0))[0]
                    reference.config.lte_routing = "dense"
                    dense = theirs(x.unsqueeze(0))[0]
                    reference.config.lte_routing = "hard"
                rows.append(
                    {
                        "host": host["path"],
                        "tokens": tokens,
                        "threshold": threshold,
                        "methods": methods,
                        "diff": (got - want).abs().max().item(),
                        "scale": want.abs().max().item(),
                        "dense_diff": (dense - want).abs().max().item(),
                    }
                )
        out[export] = {"class": type(model).__name__, "rows": rows}
    return out


def load(args: dict) -> dict:
    from vllm import LLM

    try:
        LLM(args["export"], enforce_eager=True, distributed_executor_backend="uni", **ENGINE)
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)}
    return {"error": None}


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    result = {"generate": generate, "modules": modules, "load": load}[sys.argv[1]](json.loads(sys.argv[2]))
    print("RESULT " + json.dumps(result), flush=True)
