"""Write a tiny random MoE model (a config of tests/moe_configs.py) with stories260K's tokenizer.

python scripts/tiny_moe.py FAMILY DIR        # FAMILY: qwen3_moe, qwen2_moe, mixtral, olmoe, gpt_oss
python train.py recipe=tiny model.name_or_path=DIR ...
"""

import sys
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from moe_configs import MOE_CONFIGS  # noqa: E402


def write(family: str, directory: Path, **sizes) -> Path:
    """The family's tiny config, with ``sizes`` (config attributes) changed, saved with stories260K's tokenizer."""
    config = MOE_CONFIGS[family]()
    for key, value in sizes.items():
        setattr(config, key, value)
    config.vocab_size = 512  # stories260K's tokenizer
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, None
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(REPO / "assets" / "stories260K").save_pretrained(directory)
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in MOE_CONFIGS:
        print(f"usage: python scripts/tiny_moe.py FAMILY DIR (FAMILY: {', '.join(MOE_CONFIGS)})", file=sys.stderr)
        sys.exit(2)
    print(write(sys.argv[1], Path(sys.argv[2])))
