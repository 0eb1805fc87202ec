"""vLLM plugin: serve an LTE export sparse (``vllm.general_plugins`` entry point ``lte``).

**Hook.** :func:`register` wraps vLLM's model registry (``ModelRegistry.resolve_model_cls`` and
``inspect_model_cls``) so that a checkpoint whose config carries ``lte_format_version`` resolves to
a subclass of vLLM's own class for its architecture, created on first use
(``LTELlamaForCausalLM(LlamaForCausalLM)``); every other checkpoint resolves to vLLM's class itself,
so a non-LTE model runs vLLM's code unchanged. Why this hook and not the alternatives:

* ``ModelRegistry.register_model`` replaces an architecture's class for every checkpoint (LTE or
  not) and needs a list of families; resolving per checkpoint needs neither.
* Wrapping the MLPs of the loaded model comes too late: on CPU, vLLM's
  ``process_weights_after_loading`` repacks every linear weight for oneDNN and frees the original,
  so the rows the sparse kernel reads are gone. The subclass installs routing in ``__init__``,
  after the native modules are built and before weights load: the routed projections get a
  ``RoutedLinearMethod`` (an ``UnquantizedLinearMethod``) that owns their weight processing,
  keeping one copy of the weights in the layout the kernels read.
* No copy of a model file per family: the export's FFN paths (HF module names, ``lte_ffn.hosts``)
  map to vLLM's modules through the class's own ``hf_to_vllm_mapper`` and
  ``packed_modules_mapping`` (``gate_proj`` + ``up_proj`` -> shards 0 and 1 of ``gate_up_proj``).
  The MLP's own forward (activation included) is untouched: only its projections route.

**What runs.** The first projection (gate/up, fused or not) computes the router GEMV and the
threshold per token. Up to :data:`MAX_UNION_TOKENS` tokens in the step (decode, a few concurrent
requests): the kernels (``lte_kernels.cpu`` on CPU, ``lte_kernels.triton_ffn`` on CUDA) compute
only the union of the tokens' selected experts' rows, in fixed-shape slots (selected first, zeros
after), each token's unselected experts zeroed; the down projection multiplies only those rows.
More tokens (prefill, chunked prefill, large batches): every row, unselected neurons zeroed (the
activation of 0 is 0 for the gated and plain MLPs vLLM implements), the trained model's
computation. Both paths are torch custom ops, so ``torch.compile`` traces through them. Layers
whose threshold is -1 (keep all) stay vLLM's own dense layers.

**Tensor parallelism.** Each rank routes over the experts in its slice of the intermediate
dimension (its rows of the router); a slice must hold whole experts. Down's all-reduce is vLLM's.

**Sparsity.** A log line every ``LTE_SPARSITY_LOG_INTERVAL`` seconds (default 30; 0: off) gives the
realised fraction of FFN neurons skipped since the previous line.

Imports only the export's contract (:mod:`lte.export.remote.layout`) and ``lte_kernels``.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F

from lte.export.remote import layout
from lte.export.remote.experts import MAX_UNION_TOKENS  # the remote code's: up to this many tokens use the kernels
from lte_kernels.cpu import dense_matmul_t

logger = logging.getLogger("vllm.lte")  # a child of vLLM's logger: its handlers and format


def _log_interval() -> float:
    """``LTE_SPARSITY_LOG_INTERVAL`` in seconds (30 by default; 0 turns the line off). A bad value is
    named and the default used: a plugin that fails to import would leave vLLM serving the export dense."""
    text = os.environ.get("LTE_SPARSITY_LOG_INTERVAL", "30")
    try:
        return max(0.0, float(text))
    except ValueError:
        logger.warning("LTE_SPARSITY_LOG_INTERVAL=%r is not a number of seconds; using 30", text)
        return 30.0


LOG_INTERVAL = _log_interval()
_ROUTED_CLASSES: dict[type, type] = {}
_CHECKED: set[tuple] = set()  # exports whose routers were read and checked in this process


def carries_routing(hf_config) -> bool:
    """Whether a checkpoint's config is an LTE export's (format 2 and later; format 1 is refused at load)."""
    return getattr(hf_config, layout.FORMAT_KEY, None) is not None or getattr(hf_config, "lte_ffn", None) is not None


def register() -> None:
    """The ``vllm.general_plugins`` entry point (run in every vLLM process; idempotent)."""
    from vllm import ModelRegistry

    if getattr(ModelRegistry, "_lte_routing", False):
        return
    native_resolve, native_inspect = ModelRegistry.resolve_model_cls, ModelRegistry.inspect_model_cls

    def resolve_model_cls(architectures, model_config):
        model_cls, arch = native_resolve(architectures, model_config)
        if carries_routing(model_config.hf_config):
            model_cls = routed_class(model_cls)
        return model_cls, arch

    def inspect_model_cls(architectures, model_config):
        # Runs where the engine's configuration is made (the API server's process): a damaged
        # export fails here, before any engine starts, with the layout's one-line message.
        checked = (model_config.model, model_config.revision)
        if carries_routing(model_config.hf_config) and checked not in _CHECKED:  # vLLM asks several times
            try:
                read_routers(model_config)
            except layout.ExportFormatError as error:
                raise DamagedExport(str(error)) from None
            check_hosts(model_config.hf_config.lte_ffn)
            _CHECKED.add(checked)
        return native_inspect(architectures, model_config)

    ModelRegistry.resolve_model_cls = resolve_model_cls
    ModelRegistry.inspect_model_cls = inspect_model_cls
    ModelRegistry._lte_routing = True


def read_routers(model_config) -> dict[str, torch.Tensor]:
    """The export's routers (``lte/routers.safetensors``), checked against its config.json."""
    config = model_config.hf_config
    if layout.format_version(config) < layout.FORMAT_VERSION:
        raise layout.ExportFormatError(
            f"{model_config.model}: an LTE export of format {layout.format_version(config)} (routers inside the "
            f"model weights), which vLLM cannot load. To fix: {layout.FIX}"
        )
    return layout.load_routers(config, model_config.model, revision=model_config.revision)


def routed_class(native: type) -> type:
    """``native`` (vLLM's class for the architecture) with LTE routing installed at construction."""
    if native not in _ROUTED_CLASSES:

        class Routed(native):
            def __init__(self, *, vllm_config, prefix: str = ""):
                super().__init__(vllm_config=vllm_config, prefix=prefix)
                install_routing(self, vllm_config)

        Routed.__name__ = Routed.__qualname__ = f"LTE{native.__name__}"
        Routed.__doc__ = f"vLLM's {native.__name__} with LTE-routed FFN projections (lte.serve.vllm_plugin)."
        _ROUTED_CLASSES[native] = Routed
    return _ROUTED_CLASSES[native]


def vllm_module(model, hf_name: str) -> tuple[str, int | None]:
    """(vLLM module name, shard index or None) of an HF module name, through the model class's own
    name mappers: ``hf_to_vllm_mapper`` (renamings, stacked shards) then ``packed_modules_mapping``
    (the packed module a projection is a shard of, for classes that stack in ``load_weights``)."""
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    packed = getattr(model, "packed_modules_mapping", None) or {}
    mapped = mapper.map_name(f"{hf_name}.weight") if mapper is not None else f"{hf_name}.weight"
    if mapped is None:
        raise ValueError(f"vLLM's {type(model).__name__} drops the weights of {hf_name}")
    mapped = mapped.removesuffix(".weight")
    parent, _, leaf = mapped.rpartition(".")
    original = hf_name.rpartition(".")[2]
    for packed_name, members in packed.items():
        if original in members and len(members) > 1 and leaf in (packed_name, original):
            return f"{parent}.{packed_name}", members.index(original)
    return mapped, None


def row_blocks(module, shard: int | None, chunks: int) -> list[int]:
    """Row offsets (on this rank) of the neuron blocks an HF projection fills in a vLLM linear
    module: one shard of a packed module, or all of a fused one (``chunks`` blocks)."""
    sizes = list(getattr(module, "output_partition_sizes", [module.weight.shape[0]]))
    if shard is not None:
        return [sum(sizes[:shard])]
    if len(sizes) == 1 and chunks > 1:
        sizes = [sizes[0] // chunks] * chunks
    return [sum(sizes[:i]) for i in range(len(sizes))]


class DamagedExport(RuntimeError):
    """:class:`~lte.export.remote.layout.ExportFormatError` where vLLM makes its configuration: not a
    ValueError, which vLLM's pydantic config would fold into a ValidationError whose last line is a URL."""


class RoutingError(ValueError):
    """An export this vLLM model cannot route: the message says why and what to do."""


class UnsupportedExport(RuntimeError):
    """An intact export this plugin does not serve yet, refused where vLLM makes its configuration (a
    RuntimeError for the reason :class:`DamagedExport` is one)."""


def check_hosts(ffn: dict) -> None:
    """Refuse what this plugin does not route yet: LTE inside a mixture of experts' routed experts (the hosts
    marked ``experts``), whose weights vLLM fuses into its own MoE kernels. Never served dense unasked."""
    moe = [host["path"] for host in ffn["hosts"] if host.get("experts")]
    if moe:
        raise UnsupportedExport(
            f"this export routes inside the experts of a mixture-of-experts model ({moe[0]}"
            f"{f' and {len(moe) - 1} more' if len(moe) > 1 else ''}), which the LTE vLLM plugin does not run yet. "
            "Serve it with transformers (trust_remote_code=True), or, to serve every expert dense in vLLM, "
            "start vLLM without this plugin (VLLM_PLUGINS=none, or naming only your other plugins)."
        )


def rank_module(model, name: str, host_path: str):
    """vLLM's module ``name``, or None on a pipeline-parallel rank that holds a ``PPMissingLayer`` on
    its path. Any other miss is an FFN path this model class names otherwise: refused, never served dense."""
    from vllm.model_executor.models.utils import PPMissingLayer

    module = model
    for part in name.split("."):
        if isinstance(module, PPMissingLayer):
            return None
        child = getattr(module, part, None)  # ModuleList children too: their names are "0", "1", ...
        if child is None:
            raise RoutingError(
                f"the export's FFN {host_path} maps to {name}, which vLLM's {type(model).__name__} does not have "
                "(its hf_to_vllm_mapper names it otherwise); this family cannot be routed by the plugin. Serve it "
                "with VLLM_PLUGINS=none (dense) or with transformers and trust_remote_code=True (sparse)."
            )
        module = child
    return None if isinstance(module, PPMissingLayer) else module


def install_routing(model, vllm_config) -> None:
    """Give every routed FFN's projections a ``RoutedLinearMethod``, with the routers of this
    rank's experts (``config.lte_ffn.hosts``: HF names, mapped to vLLM's)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from lte_kernels import cpu as cpu_kernels

    config = vllm_config.model_config.hf_config
    quantization = getattr(vllm_config, "quant_config", None)
    if quantization is not None:  # the checkpoint's (lte export --quantize) or the engine's own --quantization
        raise RoutingError(
            f"LTE routing in vLLM needs unquantized FFN weights; this model is quantized "
            f"({type(quantization).__name__}). Serve an export without quantization, run this one sparse with "
            f"transformers (trust_remote_code=True), or dense with VLLM_PLUGINS=none where vLLM has kernels for it."
        )
    routers = read_routers(vllm_config.model_config)
    ffn, thresholds = config.lte_ffn, list(config.lte_thresholds)
    check_hosts(ffn)
    size = ffn["expert_size"]
    method, states = routed_linear_method(), []
    for index, host in enumerate(ffn["hosts"]):
        down_name, _ = vllm_module(model, f"{host['path']}.{host['down']}")
        down = rank_module(model, down_name, host["path"])
        if down is None:
            continue  # a pipeline-parallel rank without this layer
        firsts: dict[str, list[int]] = {}
        for name in host["first"]:
            module_name, shard = vllm_module(model, f"{host['path']}.{name}")
            module = rank_module(model, module_name, host["path"])
            firsts.setdefault(module_name, []).extend(row_blocks(module, shard, host.get("fused_chunks", 1)))
        modules = [model.get_submodule(name) for name in firsts] + [down]
        for module in modules:
            if type(module.quant_method) is not UnquantizedLinearMethod:
                raise RoutingError(
                    f"LTE routing in vLLM needs unquantized FFN weights; {host['path']} uses "
                    f"{type(module.quant_method).__name__}. Serve the export without quantization."
                )
        neurons, rank, ranks = down.input_size_per_partition, down.tp_rank, down.tp_size
        if neurons % size:
            raise RoutingError(
                f"tensor_parallel_size={ranks} gives each rank {neurons} of {host['path']}'s FFN neurons, not a "
                f"whole number of {size}-neuron experts; use a tensor_parallel_size that divides "
                f"{neurons * ranks // size} (the number of experts per layer)."
            )
        experts = neurons // size
        weight = routers[layout.router_name(host) + ".weight"]
        bias = routers.get(layout.router_name(host) + ".bias")
        key = layout.router_name(host) + ".weight"
        where = os.path.join(str(vllm_config.model_config.model), layout.ROUTERS_FILE)
        layout.check_shapes({key: weight}, {key: (experts * ranks, down.weight.shape[0])}, where)
        threshold = float(thresholds[index])
        if threshold < 0:  # keeps every expert: vLLM's own dense layers
            states.append(None)
            continue
        device, rows = down.weight.device, slice(rank * experts, (rank + 1) * experts)
        state = RoutingState(
            index,
            weight[rows].to(device),
            None if bias is None else bias[rows].to(device),
            threshold,
            size,
        )
        states.append(state)
        for position, (name, blocks) in enumerate(firsts.items()):
            module = model.get_submodule(name)
            if blocks != [i * neurons for i in range(len(blocks))] or module.weight.shape[0] != len(blocks) * neurons:
                raise RoutingError(f"cannot map {host['path']}'s first projections onto vLLM's {name}")
            module.quant_method = method(state, first=True, owner=position == 0, blocks=len(blocks))
        down.quant_method = method(state, first=False)
    if any(states) and next(p for p in model.parameters()).device.type == "cpu":
        cpu_kernels.available()  # build (or load) the C++ kernel now, not on the first request
    SPARSITY.start(states)
    logger.info(
        "LTE routing: %d of %d FFN layers routed on this rank (%d-neuron experts, kernels on %d threads), "
        "thresholds %s",
        sum(s is not None for s in states),
        len(ffn["hosts"]),
        size,
        torch.get_num_threads(),
        [round(t, 4) for t in thresholds],
    )


class RoutingState:
    """One routed FFN layer on this rank: its router rows, threshold, and the selection (``order``:
    every expert, the selected ones first; ``count``) its first projection leaves for down."""

    def __init__(self, index: int, weight, bias, threshold: float, expert_size: int):
        self.index, self.threshold, self.expert_size = index, threshold, expert_size
        self.num_experts = weight.shape[0]
        self.router_weight, self.router_bias = weight, bias
        self.order = torch.arange(self.num_experts, dtype=torch.int32, device=weight.device)
        self.count = torch.zeros(1, dtype=torch.int32, device=weight.device)


def _kernels(weight: torch.Tensor):
    """(select, matvec, matvec_t) for the weight's device and dtype, or None (masked path only)."""
    if weight.device.type == "cuda":
        from lte_kernels import triton_ffn

        if triton_ffn.available():
            return triton_ffn.select_experts, triton_ffn.expert_matvec, triton_ffn.expert_matvec_t
        return None
    from lte_kernels import cpu

    if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and cpu.available():
        return cpu.select_experts, cpu.slot_matvec, cpu.slot_matvec_t
    return None


def routed_first(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    order: torch.Tensor,
    count: torch.Tensor,
    threshold: float,
    expert_size: int,
    blocks: int,
    layer: int,
    owner: bool,
) -> torch.Tensor:
    """A first projection (``blocks`` stacked blocks of neurons, e.g. gate and up): [tokens, rows],
    each token's unselected experts zeroed. Few tokens: slots (the union of their experts first,
    zeros after), and the selection written to ``order``/``count`` for down; else every row."""
    x2 = x.reshape(-1, x.shape[-1])
    tokens = x2.shape[0]
    on = torch.sigmoid(F.linear(x2.to(router_weight.dtype), router_weight, router_bias)) > threshold
    if owner:
        SPARSITY.add(layer, on)
    kernels = _kernels(weight) if tokens <= MAX_UNION_TOKENS else None
    width = weight.shape[0] // blocks
    if kernels is None:  # masked dense
        out = F.linear(x2, weight, bias).view(tokens, blocks, -1, expert_size)
        out = (out * on.view(tokens, 1, -1, 1).to(out.dtype)).view(tokens, -1)
    else:
        select, matvec, _ = kernels
        slots, selected = select(on)
        if owner:
            order.copy_(slots)
            count.copy_(selected)
        keep = on[:, slots.long()].to(x2.dtype)  # [tokens, experts] in slot order
        parts = []
        for block in range(blocks):
            part = matvec(x2, weight, slots, selected, expert_size, block * width).to(x2.dtype)
            if bias is not None:
                part = part + bias[block * width : (block + 1) * width].view(-1, expert_size)[slots.long()].reshape(-1)
            parts.append((part.view(tokens, -1, expert_size) * keep.unsqueeze(-1)).view(tokens, -1))
        out = torch.cat(parts, dim=-1)
    return out.view(*x.shape[:-1], -1)


def routed_down(
    h: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, count: torch.Tensor, expert_size: int
) -> torch.Tensor:
    """The down projection: ``weight`` [out, neurons] stored transposed (its ``.t()`` is contiguous).
    Few tokens: only the selected experts' rows (``h`` in slots, as :func:`routed_first` left it)."""
    h2 = h.reshape(-1, h.shape[-1])
    kernels = _kernels(weight) if h2.shape[0] <= MAX_UNION_TOKENS else None
    if kernels is not None:
        out = kernels[2](h2, weight.t(), order, count, expert_size).to(h2.dtype)
    else:  # every neuron (the skipped ones zeroed), on the kernels' layout
        out = dense_matmul_t(h2, weight.t())
    return out.view(*h.shape[:-1], -1)


def _fake_first(
    x, weight, bias, router_weight, router_bias, order, count, threshold, expert_size, blocks, layer, owner
):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _fake_down(h, weight, order, count, expert_size):
    return h.new_empty(*h.shape[:-1], weight.shape[0])


_first_op = torch.library.custom_op("lte_serve::routed_first", mutates_args=("order", "count"))(routed_first)
_first_op.register_fake(_fake_first)
_down_op = torch.library.custom_op("lte_serve::routed_down", mutates_args=())(routed_down)
_down_op.register_fake(_fake_down)


def _call(op, function, *args):
    """The custom op under ``torch.compile`` (opaque to the tracer, any shape); the function itself
    in eager mode (a custom op's Python dispatch costs tens of microseconds per call)."""
    return op(*args) if torch.compiler.is_compiling() else function(*args)


_METHOD_CLASS: list[type] = []


def routed_linear_method() -> type:
    """:class:`RoutedLinearMethod`, a subclass of vLLM's ``UnquantizedLinearMethod`` (made on first use:
    this module imports without vLLM)."""
    if _METHOD_CLASS:
        return _METHOD_CLASS[0]
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    class RoutedLinearMethod(UnquantizedLinearMethod):
        """A routed FFN projection's linear method: vLLM's unquantized weights (created and loaded by
        vLLM), processed for the kernels instead of oneDNN (one copy), applied through the routing."""

        def __init__(self, state: RoutingState, first: bool, owner: bool = False, blocks: int = 1):
            super().__init__()
            self.state, self.first, self.owner, self.blocks = state, first, owner, blocks

        def process_weights_after_loading(self, layer) -> None:
            weight = layer.weight.data
            if not self.first:  # down: the kernels read one row per neuron
                weight = weight.t().contiguous().t()
            layer.weight.data = weight.contiguous() if self.first else weight

        def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            s = self.state
            if self.first:
                args = (x, layer.weight, bias, s.router_weight, s.router_bias, s.order, s.count, s.threshold)
                return _call(_first_op, routed_first, *args, s.expert_size, self.blocks, s.index, self.owner)
            out = _call(_down_op, routed_down, x, layer.weight, s.order, s.count, s.expert_size)
            return out if bias is None else out + bias

    _METHOD_CLASS.append(RoutedLinearMethod)
    return RoutedLinearMethod


class SparsityLog:
    """Realised FFN sparsity: experts skipped per token and layer, logged every :data:`LOG_INTERVAL` s."""

    def __init__(self):
        self.layers = 0
        self.totals = None
        self.last = time.monotonic()

    def start(self, states) -> None:
        if LOG_INTERVAL <= 0:  # the line is off: totals stay None and the decode step counts nothing
            return
        routed = [s for s in states if s is not None]
        self.layers = len(states)
        self.experts = {s.index: s.num_experts for s in routed}
        self.totals = {s.index: torch.zeros(2, dtype=torch.float64, device=s.order.device) for s in routed}
        self.first = min(self.experts, default=None)
        self.last = time.monotonic()

    def add(self, layer: int, on: torch.Tensor) -> None:
        if self.totals is None:
            return
        total = self.totals[layer]
        # logged as a step begins (its first routed layer), so the totals hold whole steps
        due = layer == self.first and time.monotonic() - self.last >= LOG_INTERVAL
        if due and not (total.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.log()
        total[0] += on.shape[0] * on.shape[1] - on.sum()
        total[1] += on.shape[0]

    def log(self) -> None:
        self.last = time.monotonic()
        skipped = {i: t.tolist() for i, t in self.totals.items()}
        tokens = max((t[1] for t in skipped.values()), default=0)
        if not tokens:
            return
        per_layer = [skipped[i][0] / max(skipped[i][1], 1) / self.experts[i] for i in sorted(skipped)]
        overall = sum(per_layer) / self.layers  # keep-all layers skip nothing
        logger.info(
            "LTE routing: realised FFN sparsity %.1f%% over %d tokens (routed layers: %s)",
            100 * overall,
            tokens,
            " ".join(f"{100 * p:.0f}%" for p in per_layer),
        )
        for total in self.totals.values():
            total.zero_()


SPARSITY = SparsityLog()
