"""LoRA, rsLoRA and DoRA hold the method contract on all five tiny architectures."""

import pytest

import peftkit
from contract import FAMILIES, check_contract

LORA_PARAMS = r"lora_|classifier|score"  # the classification head is new, so it trains too


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(
    "config",
    [
        peftkit.LoraConfig(dropout=0.0),
        peftkit.RsLoraConfig(rank=4, dropout=0.0),
        peftkit.DoraConfig(rank=4, dropout=0.0),
        peftkit.LoraConfig(rank=2, dropout=0.0, target_modules="all-linear"),
    ],
    ids=["lora", "rslora", "dora", "lora-all-linear"],
)
def test_lora_family_contract(family, config, tmp_path):
    check_contract(family, config, tmp_path, trainable=LORA_PARAMS)
