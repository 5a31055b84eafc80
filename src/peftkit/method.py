"""The Method record: a PEFT method as a handful of plain functions, and its training hooks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from peftkit.config import from_dict, to_dict
from peftkit.errors import AdapterError, ConfigError
from peftkit.io import CONFIG_NAME, WEIGHTS_NAME


@dataclass(frozen=True)
class TrainingHooks:
    """What a method does around training; any custom training loop can call these.

    prepare(model, batches) runs once before the optimizer is built, with an iterable of task
    batches (Child-Tuning D's Fisher pass); it may replace parameters: no optimizer exists yet.
    begin_training(model, total_steps) runs when training starts, once the step budget is known
    (AdaLoRA's rank schedule, ReLoRA's restarts need it). before/after_optimizer_step(model, step)
    run around every optimizer step; extra_loss(model) returns a tensor added to the task loss
    (AdaLoRA's orthogonality term). replace_optimizer(model, optimizer) runs once the optimizer
    is built and returns the one to train with (Child-Tuning F's one-pass masked AdamW).

    state(model) -> dict and load_state(model, dict) carry what the method changes during
    training beyond its saved adapter (AdaLoRA's rank allocation, ReLoRA's restart counter)
    through a checkpoint: values are tensors, numbers, strings, lists and dicts (torch.save, read
    back with weights_only). On resume, load_state runs after begin_training, before any step."""

    prepare: Callable[[Any, Any], None] | None = None
    begin_training: Callable[[Any, int], None] | None = None
    before_optimizer_step: Callable[[Any, int], None] | None = None
    after_optimizer_step: Callable[[Any, int], None] | None = None
    extra_loss: Callable[[Any], Any] | None = None
    replace_optimizer: Callable[[Any, Any], Any] | None = None
    state: Callable[[Any], dict[str, Any]] | None = None
    load_state: Callable[[Any, dict[str, Any]], None] | None = None


def no_hooks(model: Any, config: Any) -> TrainingHooks:
    """The hooks of a method that needs none."""
    return TrainingHooks()


def combined_hooks(*hooks: TrainingHooks) -> TrainingHooks:
    """One TrainingHooks from several whose set fields do not overlap (a method's and its
    options'); two parts claiming the same moment is a bug in the method, said by name."""
    merged: dict[str, Any] = {}
    for part in hooks:
        for item in dataclasses.fields(part):
            value = getattr(part, item.name)
            if value is None:
                continue
            if item.name in merged:
                raise ConfigError(f"Two parts of one method both set the {item.name} hook.")
            merged[item.name] = value
    return TrainingHooks(**merged)


@dataclass(frozen=True)
class MethodOption:
    """A named option of a method (LoRA's initialisation, LoRA+): what it adds around the
    record's own functions, each part optional. The record runs them in its order: `check`
    before apply changes anything, `after_apply` on the applied model, `after_remove(applied,
    plain)` once the method is taken out again, `saved(config)` adds keys to
    adapter_config.json, `from_saved(saved)` gives back the config fields those keys hold, and
    `hooks` adds training hooks."""

    name: str
    description: str
    check: Callable[[Any, Any], None] | None = None
    after_apply: Callable[[Any, Any], None] | None = None
    after_remove: Callable[[Any, Any], None] | None = None
    saved: Callable[[Any], dict[str, Any]] | None = None
    from_saved: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    hooks: Callable[[Any, Any], TrainingHooks] | None = None


def peftkit_adapter_config(method_name: str) -> Callable[[Any, Any], dict[str, Any]]:
    """adapter_config.json for peftkit's own methods: no peft_type, so PEFT refuses the folder."""

    def adapter_config(model: Any, config: Any) -> dict[str, Any]:
        return {"peftkit_method": method_name, **to_dict(config)}

    return adapter_config


def config_from_peftkit_adapter(config_cls: type) -> Callable[[dict[str, Any]], Any]:
    """Read a config back from a peftkit adapter_config.json (ignoring bookkeeping keys)."""
    names = {f.name for f in dataclasses.fields(config_cls)}

    def read(saved: dict[str, Any]) -> Any:
        return from_dict(config_cls, {k: v for k, v in saved.items() if k in names})

    return read


@dataclass(frozen=True)
class RowAdapters:
    """Several saved adapters of one method on one base model, a different one (or none) per row
    of a batch: what a server needs to decode requests for different adapters together.

    add(model, name, folder) loads one more adapter and returns the model that holds it (the
    base model is wrapped on the first); remove(model, name) drops one and returns the model
    without it (the plain base once none is left); forward(model, names, **inputs) runs one
    forward in which row i goes through adapter names[i] (None: the base alone)."""

    add: Callable[[Any, str, Any], Any]
    remove: Callable[[Any, str], Any]
    forward: Callable[..., Any]


@dataclass(frozen=True)
class Composition:
    """Several adapters of one method on one base, switched and combined: what `peftkit combine`
    and the playground need from a method.

    how: the combination rules it knows; equal_ranks: those that need equal ranks;
    check_source(saved) refuses an adapter_config.json that cannot combine, saying why;
    rank(saved): an adapter's rank once loaded; check_density(how, density) refuses a rule's
    density; all of these before any model loads. load(base, {name: folder}) -> the model holding
    them all (the first active); names(model); activate(model, name); combine(model, names,
    weights, name, how=, density=, svd_rank=) adds a combination as a new adapter; delete(model,
    name); save(model, name, folder) writes one in the method's files."""

    how: tuple[str, ...]
    equal_ranks: frozenset[str]
    check_source: Callable[[dict[str, Any]], None]
    rank: Callable[[dict[str, Any]], int]
    check_density: Callable[[str, float | None], None]
    load: Callable[[Any, dict[str, Any]], Any]
    names: Callable[[Any], list[str]]
    activate: Callable[[Any, str], None]
    combine: Callable[..., Any]
    delete: Callable[[Any, str], None]
    save: Callable[[Any, str, Any], Any]


@dataclass(frozen=True)
class Conversion:
    """Rewriting a trained adapter so that it loads on the original base (PiSSA/OLoRA's adapters
    trained on a base their init rewrote): needed(saved adapter_config) says whether one must;
    write(loaded model, output folder, info) writes the converted adapter (api.convert loads)."""

    needed: Callable[[dict[str, Any]], bool]
    write: Callable[[Any, Any, dict[str, Any] | None], Any]


@dataclass(frozen=True)
class Method:
    """A PEFT method: its config class and the functions generic code calls. No subclassing."""

    name: str
    config_cls: type
    # Prepare the model (inject modules, flip requires_grad); return the model to train.
    apply: Callable[[Any, Any], Any]
    # Exactly the tensors to save, under on-disk key names; and the inverse.
    state_dict: Callable[[Any], dict[str, Any]]
    load_state_dict: Callable[[Any, dict[str, Any]], None]
    hooks: Callable[[Any, Any], TrainingHooks] = no_hooks
    # Fold the update into the base weights and return a plain transformers model.
    merge: Callable[[Any], Any] | None = None
    # Undo apply: give back the unchanged base model (used when a load fails half-way).
    remove: Callable[[Any], Any] | None = None
    # Set for methods whose files PEFT writes and reads ("LORA", ...).
    peft_type: str | None = None
    adapter_config: Callable[[Any, Any], dict[str, Any]] | None = None
    config_from_adapter: Callable[[dict[str, Any]], Any] | None = None
    description: str = field(default="")
    # For the memory estimator, only where `prepare` chooses the trainable set from data
    # (Child-Tuning D): on a meta-device model just applied, make the trainable tensors prepare
    # would make, of the sizes it would choose; which entries is what the data decides.
    prepare_without_data: Callable[[Any, Any], None] | None = None
    # Serving several of its adapters on one base, one per batch row (None: merge to serve).
    row_adapters: RowAdapters | None = None
    # Why the method needs the base's own weights in float32, for methods that change them
    # (full fine-tuning, Child-Tuning, ReLoRA's merges): a half-precision weight rounds small
    # updates away and a quantised one cannot take them. Empty: the method keeps the base frozen,
    # so the base may be stored in half precision or quantised (api.apply refuses otherwise).
    needs_float32_base: str = ""
    # Why the method cannot adapt a quantised base though it keeps the base frozen (PEFT's tuner
    # wraps plain Linear layers only). Empty: it can.
    no_quantized_base: str = ""
    # Why the method cannot train sharded (training.sharding: fsdp), for methods whose hooks
    # read or rewrite whole weights or gradients between backward and the update (a Fisher pass
    # over whole weights, a masking optimizer, merges and restarts, rank reallocation): FSDP
    # holds only a shard of each on a process. Empty: it can be sharded.
    shardable: str = ""
    # Named options of the method, run around apply, remove, saving and training (MethodOption).
    options: tuple[MethodOption, ...] = ()
    # Switch the adapter off without removing it: switch_off(applied model) -> off, and inside
    # `with off():` the model computes as the plain base (Proxy-Tuning's anti-expert, the
    # playground's base column, a preference-tuning reference model). None: the method changes
    # the base's own weights (or trains its norms), so there is no adapter to switch off.
    switch_off: Callable[[Any], Callable[[], AbstractContextManager[Any]]] | None = None
    # Several of its adapters on one base, switched and combined (peftkit combine, the playground).
    composition: Composition | None = None
    # Rewrite a trained adapter so that it loads on the original base (Conversion). None: the
    # method's adapters always load on the base they name.
    conversion: Conversion | None = None
    # After load's apply, before the tensors: check_loaded(model, saved adapter_config.json)
    # refuses, naming it, any saved field the applied model does not honour (PEFT-backed
    # methods: every field of PEFT's config). None: read_config alone decides.
    check_loaded: Callable[[Any, dict[str, Any]], None] | None = None

    def prepare(self, model: Any, config: Any) -> Any:
        """apply with the method's options around it: their checks first, their work after."""
        for option in self.options:
            if option.check is not None:
                option.check(model, config)
        tuned = self.apply(model, config)
        for option in self.options:
            if option.after_apply is not None:
                option.after_apply(tuned, config)
        return tuned

    def take_out(self, model: Any) -> Any:
        """remove, then what each option must put back on the plain base."""
        if self.remove is None:
            raise ConfigError(f"Method '{self.name}' cannot be taken out of a model.")
        plain = self.remove(model)
        for option in self.options:
            if option.after_remove is not None:
                option.after_remove(model, plain)
        return plain

    def training_hooks(self, model: Any, config: Any) -> TrainingHooks:
        """The method's own hooks and its options', as one record."""
        parts = [self.hooks(model, config)]
        parts += [option.hooks(model, config) for option in self.options if option.hooks]
        return combined_hooks(*parts)

    def saved_config(self, model: Any, config: Any) -> dict[str, Any]:
        """What goes into adapter_config.json for this method."""
        writer = self.adapter_config or peftkit_adapter_config(self.name)
        saved = writer(model, config)
        for option in self.options:
            if option.saved is not None:
                saved.update(option.saved(config))
        return saved

    def read_config(self, saved: dict[str, Any]) -> Any:
        """The config object described by a saved adapter_config.json."""
        reader = self.config_from_adapter or config_from_peftkit_adapter(self.config_cls)
        try:
            config = reader(saved)
            for option in self.options:
                if option.from_saved is not None:
                    config = dataclasses.replace(config, **option.from_saved(saved))
            return config
        except KeyError as missing:  # a hand-edited or truncated adapter_config.json
            raise AdapterError(
                f"adapter_config.json of this {self.name} adapter lacks the key {missing}; "
                "save the adapter again with peftkit or PEFT."
            ) from None


# The attribute peftkit.apply leaves on the model it returns: which method, with which config.
APPLIED_ATTRIBUTE = "_peftkit_applied"


@dataclass(frozen=True)
class Applied:
    """What apply() did to a model."""

    method: Method
    config: Any


def mark_applied(model: Any, method: Method, config: Any) -> None:
    """Note on a model which method, with which config, prepared it."""
    object.__setattr__(model, APPLIED_ATTRIBUTE, Applied(method, config))


def applied(model: Any) -> Applied:
    """The method and config apply() used on this model; an error if it was never applied."""
    found = getattr(model, APPLIED_ATTRIBUTE, None)
    if found is None:
        raise ConfigError("This model has no peftkit method applied: call peftkit.apply first.")
    return found


def adapter_files(model: Any) -> dict[str, Any]:
    """An applied model's adapter folder contents: adapter_config.json and the weights."""
    state = applied(model)
    return {
        CONFIG_NAME: state.method.saved_config(model, state.config),
        WEIGHTS_NAME: state.method.state_dict(model),
    }
