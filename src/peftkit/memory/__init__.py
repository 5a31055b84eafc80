"""Memory: what one training step will take, measured on the meta device, and which methods fit.

- `meta.py`: the model a config describes, built for a task type on the meta device (shapes, no
  memory), with any registered method applied as `peftkit.apply` applies it.
- `activations.py`: one forward pass of that applied model, recording what autograd saves.
- `estimate.py`: `estimate(model, method, ...)`: weights, gradients, AdamW state, activations.
- `table.py`: estimates side by side (the README table).
- `recommend.py`, `measured.py`: the methods that fit a budget, ranked, and the compare results
  that may rank them.

No module here names a method: methods are known only through their registry records."""
