"""Test-only fault injection, read from one environment variable (never set it in real use).

``LTE_TEST_FAULT=POINT`` SIGKILLs the process when it reaches ``POINT``; ``LTE_TEST_FAULT=pause@POINT``
stops it there (printing ``LTE_TEST_FAULT paused at POINT``) until something else kills it.
The reliability tests use it to interrupt a command at a deterministic place. Points:

* ``STAGE:stepN``: after optimizer step N of a training stage (``stage1:step3``);
* ``STAGE:checkpointN``: inside checkpoint N, after the optimizer is written, before ``trainer_state.json``;
* ``STAGE:model``: a stage's finished model is written to its temporary directory, not yet renamed;
* ``export:tuning``: ``lte export`` is tuning thresholds;
* ``export:written``: the export is written to its temporary directory, not yet renamed.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "LTE_TEST_FAULT"


def fault_point(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, _, where = spec.rpartition("@")
    if where != point:
        return
    if action == "pause":
        print(f"{ENV} paused at {point}", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)


def step_callback(stage: str):
    """A ``TrainerCallback`` that calls :func:`fault_point` after every optimizer step (None when unset)."""
    if not os.environ.get(ENV):
        return None
    from transformers import TrainerCallback

    class FaultAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            fault_point(f"{stage}:step{state.global_step}")

    return FaultAfterStep()
