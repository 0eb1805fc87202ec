"""Find every FFN of a model from its structure, and prove the layout on one traced forward.

1. **Candidates** (module tree and weight shapes only, so it also works on a meta-device
   model): a host is a module whose projections (nn.Linear, GPT-2's Conv1D, or their
   bitsandbytes/PEFT wrappers; children, or grandchildren as in BERT's ``intermediate.dense``)
   are exactly one ``down`` (F -> d, F != d) and one or two ``first`` (d -> F each, or one
   fused d -> 2F). Attention modules fail this
   (more projections, or F == d), and so does anything else that is not an FFN.
2. **Trace** (real weights): one forward of a few tokens with hooks gives each host's call
   order (``first`` is sorted by it: ``first[0]`` runs first and owns the router), checks that
   every first projection reads the same input (the FFN input) and that ``down`` runs last,
   and records the host's own inputs so it can be replayed alone.
3. **Gate**: replaying a host with one first projection's output (or one chunk of a fused
   one) negated negates the down input exactly when that projection is the "up" of
   ``act(gate) * up`` (also behind a norm); the other one passes through the activation and
   is the gate (``cluster_on``).
4. **Proof**: masking one group of neurons at the down input must change the host's output,
   and a random permutation of every FFN's neurons must leave the model's logits unchanged.

Fused routed experts (transformers' experts modules) are found and proven by :mod:`lte.model.experts`;
other MoE layouts are refused (see :func:`moe_reason`). Anything ambiguous is refused with the
candidate modules and the recipe key ``model.ffn_layout`` that settles it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import UsageError
from .experts import experts_hosts, experts_layout, prove_experts
from .registry import FFNSpec, base_projection, in_out, layout_from_list, spec_for

logger = logging.getLogger("lte")

RECIPE_HINT = (
    "if it is not an FFN, or to name the FFN yourself, set the recipe key model.ffn_layout (then only the "
    "modules it names are FFNs), e.g. model.ffn_layout='{first: [gate_proj, up_proj], down: down_proj, "
    "cluster_on: gate_proj}' (or one such entry per host class name: '{MyMLP: {first: [...], down: ...}}')"
)
TRACE_TOKENS = 8


@dataclass
class Candidate:
    """A module that looks like an FFN host by its projections' shapes."""

    path: str
    host: nn.Module
    first: tuple[str, ...]  # not yet in call order
    down: str
    fused_chunks: int
    spec: FFNSpec | None = None  # an override (registry or recipe), used as given but for the call order
    alternatives: list | None = None  # other readings of the same projections (settled by the trace)


def _projections(module: nn.Module, depth: int = 2) -> dict[str, tuple[int, int]]:
    """Projections up to ``depth`` levels below ``module`` (BERT splits its FFN over two child
    modules, ``intermediate.dense`` and ``output.dense``), by relative name; not inside a projection."""
    found = {}
    for name, child in module.named_children():
        if base_projection(child) is not None:
            found[name] = in_out(child)
        elif depth > 1 and not isinstance(child, nn.ModuleList):
            found.update({f"{name}.{n}": shape for n, shape in _projections(child, depth - 1).items()})
    return found


def _structural(path: str, module: nn.Module, d_model_hint: int | None) -> Candidate | None:
    """``module`` as an FFN host, or None. Two projections d -> F -> d read both ways; the model's
    hidden size decides, and where it does not, the trace does (``down`` runs last). Children
    first (OPT's decoder layer holds fc1/fc2 next to its attention module), then grandchildren."""
    for depth in (1, 2):
        projections = {n: s for n, s in _projections(module, depth).items() if not _beside_conv(module, n)}
        if (found := _reading(path, module, projections, d_model_hint)) is not None:
            return found
        # One more d -> d projection beside the FFN (RWKV's receptance gates the FFN's output).
        square = [n for n, (i, o) in projections.items() if i == o == d_model_hint]
        if len(square) == 1:
            rest = {n: s for n, s in projections.items() if n != square[0]}
            if (found := _reading(path, module, rest, d_model_hint)) is not None:
                return found
    return None


def _beside_conv(module: nn.Module, name: str) -> bool:
    """A projection next to a convolution belongs to a sequence mixer (Mamba's in_proj/out_proj
    around its conv1d), not to an FFN."""
    parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    return any(isinstance(child, nn.modules.conv._ConvNd) for child in parent.children())


def _reading(path: str, module: nn.Module, projections: dict, d_model_hint: int | None) -> Candidate | None:
    if not 2 <= len(projections) <= 3:
        return None
    readings = []
    for down, (width, d_model) in projections.items():
        if width == d_model:
            continue
        first = [n for n, (i, o) in projections.items() if n != down and i == d_model and o % width == 0]
        if len(first) != len(projections) - 1:
            continue
        chunks = {projections[n][1] // width for n in first}
        if (len(first) == 2 and chunks == {1}) or (len(first) == 1 and chunks <= {1, 2}):
            readings.append((d_model, Candidate(path, module, tuple(first), down, max(chunks))))
    preferred = [c for d, c in readings if d == d_model_hint] or [c for _, c in readings]
    if not preferred:
        return None
    preferred[0].alternatives = preferred[1:]
    return preferred[0]


def _override(module: nn.Module, recipe_layout: dict | None) -> FFNSpec | None:
    """The spec from the recipe key (one spec for all hosts, or per class name), else the registry."""
    if recipe_layout:
        if "down" in recipe_layout or "first" in recipe_layout:
            spec = FFNSpec.from_dict(recipe_layout)
        else:
            entry = recipe_layout.get(type(module).__name__)
            spec = FFNSpec.from_dict(entry) if entry else None
        if spec is not None and all(_has(module, n) for n in (*spec.first, spec.down)):
            return spec
        return None
    return spec_for(module)


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _check_shapes(path: str, module: nn.Module, spec: FFNSpec) -> None:
    """An override must fit the weights: every first projection d -> fused_chunks * F, down F -> d."""
    width, d_model = in_out(module.get_submodule(spec.down))
    shapes = {n: in_out(module.get_submodule(n)) for n in spec.first}
    if any(shape != (d_model, spec.fused_chunks * width) for shape in shapes.values()):
        raise UsageError(
            f"the FFN layout given for {path} ({type(module).__name__}) does not fit its weights: {spec.down} "
            f"maps {width} -> {d_model}, so each of {list(spec.first)} must map {d_model} -> "
            f"{spec.fused_chunks * width} (fused_chunks={spec.fused_chunks}), but they map "
            f"{ {n: f'{i} -> {o}' for n, (i, o) in shapes.items()} }"
        )


EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def moe_reason(model: nn.Module, candidates: list[Candidate]) -> str | None:
    """Why ``model`` is a mixture of experts, or None. Signs: a 3-D weight whose first axis counts the
    config's experts (fused expert tensors), or a ModuleList of FFN hosts inside a decoder layer."""
    config = getattr(model, "config", None)
    configs = [config, *(getattr(config, k, None) for k in getattr(config, "sub_configs", {}))]  # DBRX's ffn_config
    counts = {getattr(c, key, None) for c in configs if c is not None for key in EXPERT_COUNT_KEYS}
    counts = {c for c in counts if isinstance(c, int) and c > 1}
    for name, module in model.named_modules():
        if experts_layout(module) is not None:  # routed by lte.model.experts
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and param.shape[0] in counts:
                return (
                    f"{type(module).__name__} ({name}) stores {param.shape[0]} experts "
                    f"in a 3-D tensor {pname} {tuple(param.shape)}"
                )
    hosts = {c.path for c in candidates}
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for name in lists:
        inner = [h for h in hosts if h.startswith(name + ".") and h.count(".") == name.count(".") + 1]
        nested = any(name.startswith(other + ".") for other in lists)
        if len(inner) >= 2 and nested:
            return f"{name} is a list of {len(inner)} FFNs (routed experts) inside a decoder layer"
    return None


def candidates(model: nn.Module, recipe_layout: dict | None = None) -> list[Candidate]:
    """Every FFN host found from the module tree (no forward; works on a meta-device model)."""
    found = []
    d_model_hint = getattr(getattr(model, "config", None), "hidden_size", None)
    for path, module in model.named_modules():
        spec = _override(module, recipe_layout)
        if spec is not None:
            _check_shapes(path, module, spec)
            found.append(Candidate(path, module, spec.first, spec.down, spec.fused_chunks, spec))
        elif not recipe_layout and (candidate := _structural(path, module, d_model_hint)) is not None:
            # with model.ffn_layout, only the modules it names are FFNs
            found.append(candidate)
    # A host inside another host (a decoder layer around its MLP): keep the innermost.
    paths = [c.path for c in found]
    found = [c for c in found if not any(p != c.path and (not c.path or p.startswith(c.path + ".")) for p in paths)]
    if (reason := moe_reason(model, found)) is not None:
        raise UsageError(
            f"this MoE layout is not supported: {type(model).__name__} is a mixture of experts ({reason}) whose "
            f"experts module transformers does not declare with use_experts_implementation (its layout flags). "
            f"LTE routes inside the routed experts of such declared modules (Mixtral, Qwen-MoE, DeepSeek, "
            f"gpt-oss...: docs/moe.md); for this one, use a dense model."
        )
    if not found and not experts_hosts(model):
        names = sorted(
            {
                type(m).__name__
                for n, m in model.named_modules()
                if n and _projections(m, 1) and not isinstance(m, nn.ModuleList)
            }
        )
        raise UsageError(
            f"no FFN found in {type(model).__name__}: no module has one projection F -> d and one or two "
            f"d -> F (modules with projections: [{', '.join(names) or 'none'}]); {RECIPE_HINT}"
        )
    return found


def ffn_widths(model: nn.Module, recipe_layout: dict | None = None, saved: list[dict] | None = None) -> dict[str, int]:
    """Each FFN's width (its neuron count), from a saved layout or the module tree; works on meta."""
    routed = {path: layout.width for path, layout in experts_hosts(model).items()}
    if saved:
        return {
            path: routed[path] if path in routed else in_out(model.get_submodule(f"{path}.{spec.down}"))[0]
            for path, spec in layout_from_list(saved).items()
        }
    return {c.path: in_out(c.host.get_submodule(c.down))[0] for c in candidates(model, recipe_layout)} | routed


class _Trace:
    """Per host: the order its projections ran in, their inputs, and the host's own call."""

    def __init__(self):
        self.order: dict[str, list[str]] = {}
        self.inputs: dict[str, dict[str, torch.Tensor]] = {}
        self.host_call: dict[str, tuple] = {}


def _model_inputs(model: nn.Module) -> dict:
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, TRACE_TOKENS), generator=generator)
    device = next(model.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    try:
        out = model(**inputs, use_cache=False)
    except TypeError:
        out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    return getattr(value, "last_hidden_state", None)


def _trace(model: nn.Module, found: list[Candidate], inputs: dict) -> tuple[_Trace, torch.Tensor]:
    trace = _Trace()
    handles = []
    for c in found:
        trace.order[c.path], trace.inputs[c.path] = [], {}

        def on_host(module, args, kwargs, path=c.path):
            trace.host_call.setdefault(path, (args, kwargs))

        handles.append(c.host.register_forward_pre_hook(on_host, with_kwargs=True))
        for name in (*c.first, c.down):

            def on_projection(module, args, path=c.path, name=name):
                if name not in trace.inputs[path]:
                    trace.order[path].append(name)
                    trace.inputs[path][name] = args[0].detach()

            handles.append(c.host.get_submodule(name).register_forward_pre_hook(on_projection))
    try:
        logits = _logits(model, inputs)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # the model's own forward, unchanged (the hooks only record): not LTE's to fix
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(
            f"{type(model).__name__} fails its own forward on {TRACE_TOKENS} token ids before LTE changes anything "
            f"({type(exc).__name__}: {first}); the model or its config.json cannot run as it is (an unset special "
            f"token id such as pad_token_id, for instance): fix the model's config and rerun"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    return trace, logits


def _replay(host: nn.Module, call: tuple, hooks: list[tuple[nn.Module, str, object]]):
    """Run ``host`` alone on its recorded inputs with extra hooks; returns (host output, down input)."""
    handles = []
    try:
        for module, kind, fn in hooks:
            handles.append(module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn))
        return _first_tensor(host(*call[0], **call[1]))
    finally:
        for handle in handles:
            handle.remove()


def _capture_down(c: Candidate, call: tuple, scale: tuple[str, int] | None = None) -> torch.Tensor:
    """The down projection's input when replaying ``c``, optionally with one first projection's
    output (chunk ``scale[1]`` of ``scale[0]``, -1: all of it) negated."""
    seen = {}

    def take(module, args):
        seen.setdefault("h", args[0].detach())

    hooks = [(c.host.get_submodule(c.down), "pre", take)]
    if scale is not None:
        name, chunk = scale

        def scaled(module, args, output):
            if chunk < 0:
                return -output
            width = output.shape[-1] // c.fused_chunks
            out = output.clone()
            out[..., chunk * width : (chunk + 1) * width] *= -1
            return out

        hooks.append((c.host.get_submodule(name), "post", scaled))
    _replay(c.host, call, hooks)
    return seen["h"].float()


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    return float((a - b).norm()) <= tolerance * float(b.norm().clamp_min(1e-12))


def _tolerance(model: nn.Module) -> float:
    dtype = next(model.parameters()).dtype
    return 1e-4 if dtype == torch.float32 else 2e-2


def _gate(c: Candidate, call: tuple, tolerance: float) -> str:
    """``cluster_on``: the first projection whose output reaches the down input non-linearly."""
    if len(c.first) == 1 and c.fused_chunks == 1:
        return c.first[0]
    base = _capture_down(c, call)
    probes = [(n, -1) for n in c.first] if c.fused_chunks == 1 else [(c.first[0], k) for k in range(c.fused_chunks)]
    linear = [_close(_capture_down(c, call, probe), -base, tolerance) for probe in probes]
    nonlinear = [probe for probe, lin in zip(probes, linear, strict=True) if not lin]
    if len(nonlinear) != 1:
        what = f"projections {list(c.first)}" if c.fused_chunks == 1 else f"{c.fused_chunks} blocks of {c.first[0]}"
        twins = _twins(c, call)
        why = (
            f" (the output of {twins} has the shape of {c.first[0]}'s: added to it before the activation, as a "
            f"per-layer adapter is, it hides which block is linear)"
            if twins and not any(linear)
            else ""
        )
        raise UsageError(
            f"cannot tell the gate of the FFN candidate {c.path or 'the model'} ({type(c.host).__name__}): "
            f"{len(nonlinear)} of its {what} act non-linearly{why}; {RECIPE_HINT}"
        )
    name, chunk = nonlinear[0]
    if chunk > 0:
        raise UsageError(
            f"the fused projection {c.path}.{name} stacks the gate in block {chunk}, not first; LTE needs the "
            f"gate block first. Not supported yet for {type(c.host).__name__}."
        )
    return name


def _twins(c: Candidate, call: tuple) -> list[str]:
    """Modules of the host, besides its projections, that output what ``first[0]`` outputs (shape)
    in a replay (Zamba2's adapters, whose output is summed with its fused gate/up projection)."""
    shapes, handles = {}, []

    def record(name):
        def hook(module, args, output):
            shapes.setdefault(name, getattr(output, "shape", None))  # returns None: the output is kept

        return hook

    for name, module in c.host.named_modules():
        if name and name not in (*c.first, c.down) and base_projection(module) is None:
            handles.append(module.register_forward_hook(record(name)))
    try:
        _replay(c.host, call, [(c.host.get_submodule(c.first[0]), "post", record("_"))])
    finally:
        for handle in handles:
            handle.remove()
    return [n for n, shape in shapes.items() if n != "_" and shape == shapes.get("_")]


def _order(c: Candidate, trace: _Trace) -> tuple[str, ...]:
    order = trace.order[c.path]
    where = f"{c.path} ({type(c.host).__name__})"
    missing = [n for n in (*c.first, c.down) if n not in order]
    if missing:
        raise UsageError(
            f"the FFN candidate {where} did not call {missing} in a traced forward (first={list(c.first)}, "
            f"down={c.down}); {RECIPE_HINT}"
        )
    if order[-1] != c.down:
        raise UsageError(
            f"the FFN candidate {where} calls {order[-1]} after its down projection {c.down} "
            f"(call order {order}); {RECIPE_HINT}"
        )
    first = tuple(n for n in order if n != c.down)
    x = trace.inputs[c.path][first[0]]
    for name in first[1:]:
        if not torch.equal(trace.inputs[c.path][name], x):
            raise UsageError(
                f"the projections {list(first)} of {where} read different inputs, so none of them is the FFN "
                f"input a router can read; {RECIPE_HINT}"
            )
    return first


def _check_neurons_independent(path: str, host: nn.Module, spec: FFNSpec, call: tuple, size: int) -> None:
    """Changing one group of neurons at ``first[0]``'s output may change only that group at the down
    input: the exported model computes only the selected experts' neurons, so nothing between the
    projections (a norm over the intermediate activations, say) may mix neurons."""
    seen = []

    def take(module, args):
        seen.append(args[0].detach().float())

    def bump(module, args, output):
        out = output.clone()
        out[..., :size] += 1.0
        return out

    down, first = host.get_submodule(spec.down), host.get_submodule(spec.first[0])
    _replay(host, call, [(down, "pre", take)])
    _replay(host, call, [(down, "pre", take), (first, "post", bump)])
    base, bumped = seen[0], seen[-1]
    outside = (bumped - base)[..., size:]
    if float(outside.norm()) > 1e-6 * float(base.norm().clamp_min(1e-12)):
        raise UsageError(
            f"the FFN at {path} ({type(host).__name__}) mixes its neurons between {spec.first[0]} and "
            f"{spec.down} (changing {size} neurons changed others, e.g. a norm over the intermediate "
            f"activations), so skipped experts could not be left uncomputed; LTE does not support this FFN"
        )


@torch.no_grad()
def _prove(
    model: nn.Module,
    layout: dict[str, FFNSpec],
    trace: _Trace,
    logits: torch.Tensor,
    inputs: dict,
    group: int,
    tolerance: float,
) -> None:
    from .grouping import permute_neurons

    for path, spec in layout.items():
        host = model.get_submodule(path)
        call = trace.host_call[path]
        base = _replay(host, call, [])
        size = min(group, in_out(host.get_submodule(spec.down))[0])

        def mask(module, args, size=size):
            h = args[0].clone()
            h[..., :size] = 0
            return (h, *args[1:])

        masked = _replay(host, call, [(host.get_submodule(spec.down), "pre", mask)])
        if _close(masked.float(), base.float(), 0.0):
            raise UsageError(
                f"masking FFN neurons at the input of {path}.{spec.down} does not change the output of "
                f"{path} ({type(host).__name__}), so it is not that FFN's down projection; {RECIPE_HINT}"
            )
        _check_neurons_independent(path, host, spec, call, size)
    generator = torch.Generator().manual_seed(0)
    orders = {}
    for path, spec in layout.items():
        width = in_out(model.get_submodule(f"{path}.{spec.down}"))[0]
        orders[path] = torch.randperm(width, generator=generator)
        permute_neurons(model.get_submodule(path), spec, orders[path])
    try:
        permuted = _logits(model, inputs)
    finally:
        for path, spec in layout.items():
            permute_neurons(model.get_submodule(path), spec, torch.argsort(orders[path]))
    if not _close(permuted, logits, tolerance):
        err = float((permuted - logits).norm() / logits.norm().clamp_min(1e-12))
        raise UsageError(
            f"permuting the neurons of the detected FFNs changes {type(model).__name__}'s logits "
            f"(relative error {err:.1e}), so the layout is wrong for some of "
            f"{sorted({type(model.get_submodule(p)).__name__ for p in layout})}; {RECIPE_HINT}"
        )


@torch.no_grad()
def detect_layout(model: nn.Module, recipe_layout: dict | None = None, group: int = 1) -> dict[str, FFNSpec]:
    """``{host path: FFNSpec}`` for every FFN of ``model`` (real weights needed), proven on a trace.

    ``recipe_layout``: the recipe's ``model.ffn_layout`` (overrides detection, except that
    ``first`` is put in call order); ``group``: neurons masked by the proof (the expert size).
    """
    found = candidates(model, recipe_layout)
    if any(p.is_meta or hasattr(p, "ds_id") for p in model.parameters()):
        raise UsageError(
            "FFN detection needs the model's full weights (it traces one forward); this model is on the "
            "meta device or partitioned by ZeRO-3. Detection runs in the prepare step, which saves the "
            "layout in lte_config.json (ffn_hosts); a run written before that must be prepared again."
        )
    was_training = model.training
    model.eval()
    inputs = _model_inputs(model)
    tolerance = _tolerance(model)
    try:
        trace, logits = _trace(model, found, inputs)
        layout = {}
        for c in found:
            if c.path not in trace.host_call:
                logger.warning(
                    "FFN detection: %s (%s) is never called by a forward; left dense", c.path, type(c.host).__name__
                )
                continue
            called = trace.order[c.path]
            c = next((r for r in [c, *(c.alternatives or [])] if called and called[-1] == r.down), c)
            first = _order(c, trace)
            if c.spec is not None:
                layout[c.path] = FFNSpec(
                    first=first, down=c.down, cluster_on=c.spec.cluster_on, fused_chunks=c.fused_chunks
                )
                continue
            cluster_on = _gate(
                Candidate(c.path, c.host, first, c.down, c.fused_chunks), trace.host_call[c.path], tolerance
            )
            layout[c.path] = FFNSpec(first=first, down=c.down, cluster_on=cluster_on, fused_chunks=c.fused_chunks)
        routed = prove_experts(model, inputs, logits, group, tolerance)
        if not layout and not routed:
            raise UsageError(f"no FFN of {type(model).__name__} runs in a forward; {RECIPE_HINT}")
        _prove(model, layout, trace, logits, inputs, group, tolerance)
        depth = {name: i for i, (name, _) in enumerate(model.named_modules())}  # layer indices follow depth
        layout = dict(sorted((layout | routed).items(), key=lambda item: depth[item[0]]))
    finally:
        model.train(was_training)
    return layout


def describe(layout: dict[str, FFNSpec]) -> str:
    """One line per distinct layout: ``MLPClass: first=[...] down=... (N hosts)``."""
    groups: dict[FFNSpec, int] = {}
    for spec in layout.values():
        groups[spec] = groups.get(spec, 0) + 1
    return "; ".join(
        f"first={list(s.first)} down={s.down} cluster_on={s.cluster_on}"
        + (f" fused_chunks={s.fused_chunks}" if s.fused_chunks > 1 else "")
        + f" ({n} FFNs)"
        for s, n in groups.items()
    )
