"""`peftkit train` under torchrun with every process's logged losses, and the parameter elements
it holds once sharded, written to `losses-<rank>.json` in a folder (Trainer prints the losses on
the main process only). With PEFTKIT_TEST_KILL="RANK:STEP" in its environment, process RANK
kills itself with SIGKILL as it starts training step STEP (counted from 1)."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from pathlib import Path

from peftkit.cli import main
from peftkit.training.trainer import PeftkitTrainer

training_run = importlib.import_module("peftkit.training.run")  # the module, not run()
logged: list[dict] = []
held: dict[str, int] = {}
original = PeftkitTrainer.log
original_shard = training_run.shard
original_step = PeftkitTrainer.training_step


def log(self, logs, *args, **kwargs):  # noqa: ANN001, ANN202
    """Keep each training-loss record this process logs, then log as usual."""
    if "loss" in logs:
        logged.append({"step": self.state.global_step, "loss": logs["loss"]})
    return original(self, logs, *args, **kwargs)


def shard(model, precision):  # noqa: ANN001, ANN201
    """Shard as training does, then count the parameter elements this process holds."""
    units = original_shard(model, precision)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    held.update(total=sum(p.numel() for p in model.parameters()),
                local=sum(t.numel() for t in local))  # fmt: skip
    return units


def killing_step(self, *args, **kwargs):  # noqa: ANN001, ANN202
    """SIGKILL this process at the step PEFTKIT_TEST_KILL names for its rank."""
    rank, step = os.environ["PEFTKIT_TEST_KILL"].split(":")
    if os.environ.get("RANK", "0") == rank and self.state.global_step + 1 == int(step):
        os.kill(os.getpid(), signal.SIGKILL)
    return original_step(self, *args, **kwargs)


if __name__ == "__main__":
    PeftkitTrainer.log = log
    if "PEFTKIT_TEST_KILL" in os.environ:
        PeftkitTrainer.training_step = killing_step
    training_run.shard = shard
    folder = Path(sys.argv[1])
    code = main(sys.argv[2:])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"losses-{os.environ.get('RANK', '0')}.json").write_text(
        json.dumps({"losses": logged, "parameters": held})
    )
    sys.exit(code)
