"""Export format 2 (lte/export/remote/layout.py): the model's weight files hold only the base
model's tensors, the routers are in lte/routers.safetensors; the remote code loads them from a
folder or a hub repository, under device_map loading, and fails clearly on a damaged export;
save_pretrained (also after merge_and_unload, and for push_to_hub) writes the same layout;
format 1 exports (routers in the weights) still load."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_export import _export_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from lte.export.remote.layout import FORMAT_KEY, ROUTERS_FILE, ExportFormatError, load_routers, routers_file

ROUTERS = {f"model.layers.{i}.mlp.gate_proj.router.weight" for i in range(2)}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K")


@pytest.fixture
def export(tmp_path, tokenizer):
    directory = tmp_path / "llama"
    _export_tiny("llama", directory, tokenizer)
    return directory


def load(directory, **kwargs):
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, **kwargs).eval()


def weight_tensor_names(directory: Path) -> set[str]:
    """Every tensor name in the top-level *.safetensors and the index: what base loaders read."""
    names = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names |= set(f.keys())
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names |= set(json.loads(index.read_text())["weight_map"])
    return names


def logits(model, directory):
    expected = torch.load(directory / "expected.pt")
    with torch.no_grad():
        return model(expected["ids"]).logits, expected


def test_the_export_keeps_routers_out_of_the_weight_files(export):
    config = json.loads((export / "config.json").read_text())
    assert config[FORMAT_KEY] == 2 and config["architectures"] == ["LlamaForCausalLM"]
    assert not ROUTERS & weight_tensor_names(export) and weight_tensor_names(export)
    routers = load_file(export / ROUTERS_FILE)
    assert set(routers) == ROUTERS and all(r.shape == (8, 32) for r in routers.values())  # 64 neurons / 8
    with safe_open(export / ROUTERS_FILE, "pt") as f:
        assert f.metadata() == {FORMAT_KEY: "2"}
    assert (export / "lte_layout.py").read_text() == (REPO / "lte/export/remote/layout.py").read_text()
    model, info = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()  # no router reported missing
    got, expected = logits(model.eval(), export)
    torch.testing.assert_close(got, expected["sparse"], atol=1e-5, rtol=1e-5)


def test_a_sharded_export_has_no_router_in_any_shard_or_the_index(tmp_path, tokenizer):
    _export_tiny("llama", tmp_path / "sharded", tokenizer, max_shard_size="20KB")
    directory = tmp_path / "sharded"
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert not ROUTERS & set(index["weight_map"]) and not ROUTERS & weight_tensor_names(directory)
    assert set(load_file(directory / ROUTERS_FILE)) == ROUTERS
    got, expected = logits(load(directory), directory)
    torch.testing.assert_close(got, expected["sparse"], atol=1e-5, rtol=1e-5)


def test_device_map_loading_gives_real_routers_with_the_checkpoints_values(export):
    routers = load_file(export / ROUTERS_FILE)
    for kwargs in (
        {"device_map": "cpu"},
        {"device_map": "auto"},
        {"low_cpu_mem_usage": True},
        {"device_map": "cpu", "dtype": torch.bfloat16},
    ):
        model = load(export, **kwargs)
        parameters = dict(model.named_parameters())
        for name, value in routers.items():
            assert parameters[name].device.type == "cpu", name  # not left on meta
            torch.testing.assert_close(parameters[name], value.to(parameters[name].dtype), rtol=0, atol=0)
        assert not any(p.device.type == "meta" for p in model.parameters())
    got, expected = logits(load(export, device_map="cpu"), export)
    torch.testing.assert_close(got, expected["sparse"], atol=1e-5, rtol=1e-5)


def _as_hub_cache(export: Path, cache: Path, repo: str = "org/tiny-lte") -> str:
    """``export`` laid out as the hub cache holds a downloaded repository."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(export, root / "snapshots" / sha)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(sha)
    return repo


def test_a_hub_repository_loads_offline_from_the_cache(export, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = _as_hub_cache(export, tmp_path / "hub")
    path = routers_file(repo, cache_dir=tmp_path / "hub", local_files_only=True)
    assert path.startswith(str(tmp_path / "hub")) and path.endswith(ROUTERS_FILE)
    model = load(repo, cache_dir=tmp_path / "hub", local_files_only=True)
    got, expected = logits(model, export)
    torch.testing.assert_close(got, expected["sparse"], atol=1e-5, rtol=1e-5)
    (export / ROUTERS_FILE).unlink()
    shutil.rmtree(tmp_path / "hub")
    _as_hub_cache(export, tmp_path / "hub")  # the repository without its routers: named, with the fix
    with pytest.raises(ValueError, match=r"lte/routers\.safetensors: not found.*lte export") as caught:
        load(repo, cache_dir=tmp_path / "hub", local_files_only=True)
    assert type(caught.value).__name__ == "ExportFormatError"  # the export's copy of the class


def test_a_format_1_export_still_loads(export):
    """Format 1: routers inside model.safetensors, no lte_format_version in config.json."""
    weights = load_file(export / "model.safetensors")
    save_file({**weights, **load_file(export / ROUTERS_FILE)}, export / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(export / "lte")
    config = json.loads((export / "config.json").read_text())
    del config[FORMAT_KEY]
    (export / "config.json").write_text(json.dumps(config))
    model, info = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    got, expected = logits(model.eval(), export)
    torch.testing.assert_close(got, expected["sparse"], atol=1e-5, rtol=1e-5)


def _damage(export: Path, how: str) -> None:
    routers = load_file(export / ROUTERS_FILE)
    name = "model.layers.1.mlp.gate_proj.router.weight"
    if how == "no router file":
        (export / ROUTERS_FILE).unlink()
    elif how == "a router missing":
        save_file({k: v for k, v in routers.items() if k != name}, export / ROUTERS_FILE)
    elif how == "a router of the wrong shape":
        save_file({**routers, name: routers[name][:4]}, export / ROUTERS_FILE)
    else:
        config = json.loads((export / "config.json").read_text())
        config["lte_thresholds"] = config["lte_thresholds"][:1]
        (export / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("no router file", r"lte/routers\.safetensors: not found"),
        ("a router missing", r"lte/routers\.safetensors: does not match .*missing model\.layers\.1\.mlp\.gate_proj"),
        ("a router of the wrong shape", r"lte: model\.layers\.1\.mlp\.gate_proj\.router\.weight has shape \[4, 32\]"),
        ("thresholds of the wrong length", r"config\.json: lte_thresholds has 1 values for 2 FFN layers"),
    ],
)
def test_a_damaged_export_fails_at_load_with_one_message(export, how, message):
    _damage(export, how)
    with pytest.raises(ValueError, match=message) as caught:  # the export's copy of ExportFormatError
        load(export)
    assert type(caught.value).__name__ == "ExportFormatError"
    text = str(caught.value)
    assert "\n" not in text and "re-export the run with `lte export`" in text
    if how != "thresholds of the wrong length":
        assert str(export) in text  # the file, with its folder


def test_load_routers_reads_a_plain_config_dict(export):
    config = json.loads((export / "config.json").read_text())
    assert set(load_routers(config, export)) == ROUTERS
    with pytest.raises(ExportFormatError, match=r"lte_thresholds has 3 values for 2 FFN layers"):
        load_routers({**config, "lte_thresholds": [0.5] * 3}, export)


def _saved_layout(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text())
    return {
        "architectures": config["architectures"],
        "format": config.get(FORMAT_KEY),
        "routers": set(load_file(directory / ROUTERS_FILE)) if (directory / ROUTERS_FILE).is_file() else set(),
        "routers_in_weights": ROUTERS & weight_tensor_names(directory),
    }


FORMAT_2 = {"architectures": ["LlamaForCausalLM"], "format": 2, "routers": ROUTERS, "routers_in_weights": set()}


def test_save_pretrained_and_merge_and_unload_write_format_2(export, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = load(export)
    model.save_pretrained(tmp_path / "resaved", max_shard_size="20KB")  # sharded too
    assert _saved_layout(tmp_path / "resaved") == FORMAT_2
    got, expected = logits(type(model).from_pretrained(tmp_path / "resaved").eval(), export)  # the class itself
    torch.testing.assert_close(got, expected["sparse"], atol=1e-5, rtol=1e-5)

    peft_model = get_peft_model(load(export), LoraConfig(target_modules="all-linear", r=4, init_lora_weights=False))
    with torch.no_grad():
        want = peft_model(torch.load(export / "expected.pt")["ids"]).logits
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert _saved_layout(tmp_path / "merged") == FORMAT_2
    got, _ = logits(load(tmp_path / "merged"), export)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_push_to_hub_uploads_the_routers_file(export, monkeypatch):
    """transformers' push_to_hub saves with save_pretrained into a temporary folder and uploads that
    folder (utils/hub.py, PushToHubMixin.push_to_hub): the upload holds the format-2 layout."""
    import transformers.utils.hub as hub

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kwargs):
            for op in operations:
                uploaded[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
            return "commit"

    class FakeCard:
        def save(self, path):
            Path(path).write_text("card")

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: FakeCard())
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "hf_api", lambda: FakeApi(), raising=False)
    monkeypatch.setattr(transformers.modeling_utils, "create_and_tag_model_card", lambda *a, **k: FakeCard())
    model = load(export)
    pushes = (
        lambda: model.push_to_hub("org/pushed"),
        lambda: model.save_pretrained(export.parent / "p", push_to_hub=True),
    )
    for push in pushes:
        uploaded.clear()
        push()
        assert ROUTERS_FILE in uploaded, sorted(uploaded)
        with safe_open_bytes(uploaded[ROUTERS_FILE]) as routers:
            assert set(routers) == ROUTERS
        config = json.loads(uploaded["config.json"])
        assert config[FORMAT_KEY] == 2 and config["architectures"] == ["LlamaForCausalLM"]
        with safe_open_bytes(uploaded["model.safetensors"]) as weights:
            assert weights and not ROUTERS & set(weights)


class safe_open_bytes:
    def __init__(self, data: bytes):
        from safetensors.torch import load

        self.tensors = load(data)

    def __enter__(self):
        return self.tensors

    def __exit__(self, *exc):
        return False


def test_a_bf16_prompt_on_the_kernels_layout_gives_what_the_base_layout_gives(export, monkeypatch):
    """bf16 on CPU: from_pretrained re-strides down for the kernels; a prompt longer than the kernels take runs
    the masked path on that layout (an fp32 GEMM: ATen's bf16 one is a scalar loop there without bf16
    instructions) and must give the logits of the weights in nn.Linear's own layout."""
    model = load(export, dtype=torch.bfloat16)
    downs = [m for n, m in model.named_modules() if n.endswith("down_proj")]
    assert downs and all(not m.weight.is_contiguous() for m in downs)  # the kernels' layout
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    code = sys.modules[type(model).__module__]  # the export's modeling_lte.py
    calls = []
    monkeypatch.setattr(code, "_cpu_dense_matmul_t", lambda *a, f=code._cpu_dense_matmul_t: calls.append(1) or f(*a))
    with torch.no_grad():
        got = model(ids).logits.float()
        assert len(calls) == len(downs)  # every down projection ran the product on the kernels' layout
        for m in downs:
            m.weight.data = m.weight.data.contiguous()
        want = model(ids).logits.float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
