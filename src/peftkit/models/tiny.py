"""Tiny random models (hidden 32, 2 layers) of each architecture family, with a byte-level
tokenizer built in code: the whole test suite runs offline on them."""

from __future__ import annotations

from typing import Any

from peftkit.errors import ModelNotFoundError

TINY_FAMILIES = ("bert", "t5", "gpt2", "llama", "qwen2")


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + 4 specials) for the tiny test models; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
    )


def tiny_config(family: str, vocab_size: int = 260) -> Any:
    """A tiny random config (hidden 32, 2 layers) of one architecture family, for tests."""
    import transformers

    common = {"vocab_size": vocab_size, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    # transformers' default init (std 0.02) caps a tiny model's logits near +-0.6 through the tied
    # output embeddings, so no adapter could fit anything; std 0.2 leaves the models learnable.
    init = {"initializer_range": 0.2}
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=256, **common, **init,
        )  # fmt: skip
    if family == "t5":
        return transformers.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0, **common,
        )  # fmt: skip
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=256, **common, **init
        )
    if family in ("llama", "qwen2"):
        config_class = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        # Fewer key/value heads than query heads: grouped-query attention, as the real models.
        return config_class(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **common, **init,
        )  # fmt: skip
    raise ModelNotFoundError(
        f"No tiny config for '{family}'; tiny families: {', '.join(TINY_FAMILIES)}."
    )
