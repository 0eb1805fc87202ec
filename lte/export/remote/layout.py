"""The export's file layout (format 2), shared by ``lte export``, the remote code and serving plugins.

Loaders of the base architecture (the transformers base class, vLLM, converters) read the
top-level ``*.safetensors`` and ``model.safetensors.index.json``: those hold ONLY the base
model's tensors, so every such loader gets the dense model. What is LTE's lives under ``lte/``:
the routers in :data:`ROUTERS_FILE`, one per FFN host, named after the module that owns it.
Format 1 exports (no :data:`FORMAT_KEY` in config.json) kept the routers in the model weights.

Copied into each export as ``lte_layout.py``; imports only torch, transformers and safetensors.
"""

import os

import torch

FORMAT_VERSION = 2
FORMAT_KEY = "lte_format_version"
ROUTERS_FILE = "lte/routers.safetensors"
FIX = "re-export the run with `lte export`, or copy the export's lte/ folder along with its weights"
# The from_pretrained arguments that locate a file in a local folder or a hub repository.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "_commit_hash")


class ExportFormatError(ValueError):
    """A damaged or incomplete export: the message names the file and the fix."""


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def router_name(host: dict) -> str:
    """The module that owns a host's router: its first projection's ``router``; for routed experts
    (``host["experts"]``), the experts module's ``lte_router`` (one [groups, in_features] block per expert)."""
    if host.get("experts"):
        return f"{host['path']}.lte_router"
    return f"{host['path']}.{host['first'][0]}.router"


def router_keys(config) -> list[str]:
    """Every router tensor's name, in host order (weight, then bias when ``lte_ffn.router_bias``)."""
    ffn = _get(config, "lte_ffn") or {}
    suffixes = (".weight", ".bias") if ffn.get("router_bias") else (".weight",)
    return [router_name(host) + suffix for host in ffn.get("hosts", []) for suffix in suffixes]


def format_version(config) -> int:
    """The export's format: 1 for exports without :data:`FORMAT_KEY` (routers inside the model weights)."""
    return int(_get(config, FORMAT_KEY) or 1)


def routers_file(name_or_path, subfolder: str = "", **hub_kwargs) -> str:
    """The local path of :data:`ROUTERS_FILE` in a folder or a hub repository (downloaded if needed)."""
    where = os.path.join(str(name_or_path), subfolder, ROUTERS_FILE)
    if os.path.isdir(name_or_path):
        if os.path.isfile(where):
            return where
        resolved = None
    else:
        from transformers.utils import cached_file

        kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
        try:
            resolved = cached_file(
                name_or_path,
                ROUTERS_FILE,
                subfolder=subfolder,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **kwargs,
            )
        except OSError:
            resolved = None
    if resolved is None:
        raise ExportFormatError(
            f"{where}: not found; this LTE export (format {FORMAT_VERSION}) keeps its routers there. To fix: {FIX}"
        )
    return resolved


def load_routers(config, name_or_path, subfolder: str = "", **hub_kwargs) -> dict[str, torch.Tensor]:
    """The routers of a format-2 export, checked against ``config``: one per host, with the shape
    the host's FFN gives and a bias exactly when ``lte_ffn.router_bias``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_config(config)
    path = routers_file(name_or_path, subfolder, **hub_kwargs)
    try:
        routers = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ExportFormatError(f"{path}: unreadable ({error}). To fix: {FIX}") from None
    expected = router_keys(config)
    missing = [k for k in expected if k not in routers]
    extra = sorted(set(routers) - set(expected))
    if missing or extra:
        named = [f"missing {', '.join(missing[:3])}" if missing else "", f"unexpected {', '.join(extra[:3])}"]
        raise ExportFormatError(
            f"{path}: does not match config.json's lte_ffn ({'; '.join(n for n in named if n)}). To fix: {FIX}"
        )
    ffn = _get(config, "lte_ffn")
    for host in ffn["hosts"]:
        weight = routers[router_name(host) + ".weight"]
        bias = routers.get(router_name(host) + ".bias")
        dims = 3 if host.get("experts") else 2
        if weight.dim() != dims or (bias is not None and tuple(bias.shape) != tuple(weight.shape[:-1])):
            shape = "[routed_experts, groups, in_features]" if dims == 3 else "[num_experts, in_features]"
            raise ExportFormatError(
                f"{path}: {router_name(host)} has shape {list(weight.shape)}"
                f"{'' if bias is None else f' (bias {list(bias.shape)})'}, not {shape}. "
                f"To fix: {FIX}"
            )
    return routers


def check_shapes(routers: dict[str, torch.Tensor], expected: dict[str, tuple], path: str) -> None:
    """``routers`` against the shapes the model's FFNs need (``expected``: name -> shape)."""
    for name, shape in expected.items():
        if tuple(routers[name].shape) != tuple(shape):
            raise ExportFormatError(
                f"{path}: {name} has shape {list(routers[name].shape)}, the model's FFN needs {list(shape)} "
                f"(num_experts = neurons // expert_size). To fix: {FIX}"
            )


def check_config(config) -> None:
    """config.json's LTE keys are consistent: one threshold per FFN host."""
    ffn = _get(config, "lte_ffn") or {}
    hosts, thresholds = ffn.get("hosts") or [], _get(config, "lte_thresholds") or []
    if not hosts or "expert_size" not in ffn:
        raise ExportFormatError(f"config.json: lte_ffn lists no FFN hosts or no expert_size. To fix: {FIX}")
    if len(thresholds) != len(hosts):
        raise ExportFormatError(
            f"config.json: lte_thresholds has {len(thresholds)} values for {len(hosts)} FFN layers (lte_ffn.hosts); "
            f"it needs one per layer. To fix: {FIX}"
        )


def save_routers(routers: dict[str, torch.Tensor], directory) -> str:
    """Write :data:`ROUTERS_FILE` under ``directory`` (contiguous CPU copies, format metadata)."""
    from safetensors.torch import save_file

    path = os.path.join(str(directory), ROUTERS_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in routers.items()}
    save_file(tensors, path, metadata={FORMAT_KEY: str(FORMAT_VERSION)})
    return path
