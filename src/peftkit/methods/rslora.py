"""rsLoRA (Kalajdzievski, 2023): LoRA scaled by alpha / sqrt(r), so higher ranks keep learning."""

from dataclasses import dataclass, field

from peftkit.methods.lora import LoraConfig, lora_method


@dataclass(frozen=True)
class RsLoraConfig(LoraConfig):
    """LoRA with the rank-stabilised scale alpha / sqrt(r)."""

    use_rslora: bool = field(default=True, metadata={"help": "scale by alpha / sqrt(r)"})


RSLORA = lora_method("rslora", RsLoraConfig, "LoRA scaled by alpha / sqrt(r) (HF PEFT)")
