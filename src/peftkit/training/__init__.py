"""Training: one run from a recipe (run.py) on transformers.Trainer with the method's hooks
(trainer.py), several processes (distributed.py), checkpoints that appear only when complete
(checkpoints.py), and what a run cost (measure.py)."""

from peftkit.training.distributed import finish_distributed
from peftkit.training.run import evaluate, load_for_plan, run

__all__ = ["evaluate", "finish_distributed", "load_for_plan", "run"]
