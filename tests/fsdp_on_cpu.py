"""Run ``train.py`` under accelerate's FSDP2 path on CPU processes (gloo), for the tests.

accelerate enables FSDP only for accelerator process groups (its ``AcceleratorState`` checks for
MULTI_GPU/NPU/XPU/...); torch's FSDP2 (``fully_shard``) itself runs on CPU with gloo. This shim
starts the process state on the CPU and lets accelerate take its FSDP branch, then runs the
unchanged training entry point, so the test exercises the same sharding, state-dict gathering
and checkpointing code a GPU run does. Usage (as ``train.py``):
    accelerate launch --config_file accelerate_configs/fsdp2.yaml --num_processes 2 tests/fsdp_on_cpu.py recipe=tiny ...
"""

import runpy
import sys
from pathlib import Path

from accelerate.state import PartialState
from accelerate.utils import DistributedType

_init = PartialState.__init__


def _init_taking_fsdp_branch(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU  # the only change; the device stays the CPU


PartialState.__init__ = _init_taking_fsdp_branch
train = Path(__file__).resolve().parents[1] / "train.py"
sys.argv[0] = str(train)
runpy.run_path(str(train), run_name="__main__")
