"""DoRA (Liu et al., 2024): W' = m * (W + BA) / ||W + BA||_c; LoRA moves the direction, m trains."""

from dataclasses import dataclass, field

from peftkit.methods.lora import LoraConfig, lora_method


@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """LoRA with weight decomposition into magnitude and direction."""

    use_dora: bool = field(default=True, metadata={"help": "DoRA magnitude/direction split"})


DORA = lora_method("dora", DoraConfig, "LoRA on the direction plus a trained magnitude (HF PEFT)")
