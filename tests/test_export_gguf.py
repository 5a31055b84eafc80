"""GGUF export on tiny models: the file loads back through transformers' own GGUF reader (an
independent implementation of llama.cpp's conventions) with the merged model's logits, its
tokenizer encodes as the original does, and Llama's query/key rows are in llama.cpp's rotary order
(checked against llama.cpp's rotation written out from its definition)."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import peftkit
from contract import batch_for, logits, tiny
from peftkit.export import export_gguf
from peftkit.export.architectures import interleave_rotary_rows
from peftkit.export.tokenizer import PRE_TOKENIZERS
from peftkit.models import tiny_config, tiny_tokenizer

# --outtype -> largest logit difference allowed, relative to the largest logit. f32 stores the
# weights as they are; f16 rounds them to 11 significant bits; q8_0 to 8-bit values in blocks of
# 32 sharing one scale, which these tiny std-0.2 models feel far more than SmolLM2 does (docs),
# so its weights are checked exactly against the format's definition instead.
TOLERANCE = {"f32": 1e-5, "f16": 1e-2, "q8_0": 0.15}


def q8_0_rounded(weight: torch.Tensor) -> torch.Tensor:
    """A matrix as q8_0 stores it, from the format's definition: each run of 32 values along a
    row shares one scale d = max|x| / 127 (kept as f16) and keeps round(x / d) as an int8."""
    blocks = weight.double().reshape(-1, 32)
    scale = blocks.abs().amax(1, keepdim=True) / 127
    steps = blocks / scale.where(scale > 0, torch.ones_like(scale))
    steps = steps.sign() * (steps.abs() + 0.5).floor()  # ggml rounds halves away from zero
    return (steps * scale.half().double()).reshape(weight.shape).float()


def merged_lora(family: str) -> tuple[torch.nn.Module, object]:
    """A tiny model with a LoRA adapter (random B, so it changes the outputs) merged in."""
    model, tokenizer = tiny(family)
    tuned = peftkit.apply(model, peftkit.LoraConfig(rank=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)
    return peftkit.merge(tuned).eval(), tokenizer


def read_back(path: Path) -> torch.nn.Module:
    """The exported file as transformers' GGUF reader rebuilds it."""
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


def relative_difference(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """Largest difference over the largest magnitude."""
    return ((expected - actual).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merged_lora_round_trips_through_transformers_gguf_reader(family, tmp_path):
    merged, tokenizer = merged_lora(family)
    base, _ = tiny(family)
    batch = batch_for(family, tokenizer)
    batch.pop("labels")
    expected = logits(merged, batch)
    assert relative_difference(expected, logits(base, batch)) > 0.05  # the adapter matters
    loaded = {}
    for outtype, tolerance in TOLERANCE.items():
        path = tmp_path / f"{family}.{outtype}.gguf"
        report = export_gguf(merged, tokenizer, path, outtype=outtype)
        loaded[outtype] = read_back(path)
        assert type(loaded[outtype]) is type(merged)
        assert relative_difference(expected, logits(loaded[outtype], batch)) <= tolerance, outtype
        assert report["tied_output"] is merged.config.tie_word_embeddings
    weights = dict(merged.named_parameters())
    for name, stored in loaded["q8_0"].named_parameters():
        expected_weight = weights[name].detach()
        if stored.ndim == 2:  # matrices are quantised; norms stay f32
            expected_weight = q8_0_rounded(expected_weight)
        torch.testing.assert_close(stored, expected_weight, rtol=0, atol=1e-6)


def test_gpt2_round_trips_with_its_conv1d_weights_transposed(tmp_path):
    config = tiny_config("gpt2")
    config.n_positions = 1024  # transformers reads GPT-2's context back as 1024 (see docs)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 9))
    export_gguf(model, tiny_tokenizer(), tmp_path / "gpt2.gguf", outtype="f32")
    with torch.no_grad():
        torch.testing.assert_close(read_back(tmp_path / "gpt2.gguf")(ids).logits, model(ids).logits)


def test_file_holds_llama_cpp_metadata_and_names(tmp_path):
    merged, tokenizer = merged_lora("llama")
    export_gguf(merged, tokenizer, tmp_path / "m.gguf", outtype="q8_0", name="tiny run")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    value = {key: field.contents() for key, field in reader.fields.items()}
    config = merged.config
    assert value["general.architecture"] == "llama" and value["general.name"] == "tiny run"
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert value["llama.attention.head_count"] == 4 and value["llama.attention.head_count_kv"] == 2
    assert value["llama.rope.freq_base"] == config.rope_parameters["rope_theta"]
    assert value["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert value["llama.context_length"] == 256 and value["llama.rope.dimension_count"] == 8
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    assert value["tokenizer.ggml.merges"] == []  # the tiny vocabulary is bytes only
    assert value["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay f32
    assert types["blk.1.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= set(types)


def test_tied_output_is_stored_once_as_token_embd(tmp_path):
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    export_gguf(model, tiny_tokenizer(), tmp_path / "tied.gguf", outtype="f32")
    names = {tensor.name for tensor in gguf.GGUFReader(tmp_path / "tied.gguf").tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    loaded = read_back(tmp_path / "tied.gguf")
    assert loaded.config.tie_word_embeddings
    ids = torch.randint(0, 260, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def norm_rope(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """llama.cpp's rotation for Llama (ggml rope mode 0): each head's adjacent values (2i, 2i+1)
    turn by position * theta^(-2i/d). Written from its definition, not from transformers."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    half = pairs.shape[-2]
    angle = position * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / (2 * half))
    cos, sin = angle.cos(), angle.sin()
    first, second = pairs[..., 0], pairs[..., 1]
    return torch.stack([first * cos - second * sin, first * sin + second * cos], -1).flatten(-2)


def test_interleaved_rows_under_llama_cpp_rotation_equal_transformers_rotation():
    config = tiny_config("llama")
    heads, head_dim, theta = 4, 8, config.rope_parameters["rope_theta"]
    weight = torch.randn(heads * head_dim, 32, dtype=torch.float64)
    x = torch.randn(32, dtype=torch.float64)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    position = 5
    cos, sin = rotary(x.float()[None, None], torch.tensor([[position]]))
    q = (weight @ x).reshape(1, heads, 1, head_dim)
    hf, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(
        q, q, cos.double(), sin.double()
    )
    exported = torch.from_numpy(interleave_rotary_rows(weight.numpy(), heads))
    cpp = norm_rope((exported @ x).reshape(heads, head_dim), position, theta)
    # llama.cpp's head output, read back in transformers' order, is transformers' head output
    back = interleave_rotary_rows(hf.reshape(heads * head_dim, 1).numpy(), heads)
    torch.testing.assert_close(cpp.reshape(-1), torch.from_numpy(back).reshape(-1))


def test_tiny_byte_tokenizer_round_trips(tmp_path):
    model, tokenizer = tiny("llama")
    export_gguf(model, tokenizer, tmp_path / "t.gguf", outtype="f16")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in ["hello world", "Grüße, 123 ünïcödé!\n\tok", "<s>x</s><pad>"]:
        assert back.encode(text) == tokenizer.encode(text)
        assert back.decode(back.encode(text)) == text
    for role in ("bos", "eos", "unk", "pad"):
        assert getattr(back, f"{role}_token_id") == getattr(tokenizer, f"{role}_token_id")


def trained_bpe() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE with real merges, Qwen2's split, chat tokens and a chat template."""
    core = Tokenizer(models.BPE())
    split = pre_tokenizers.Split(Regex(PRE_TOKENIZERS["qwen2"][0]["regex"]), "isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    text = "the cat sat on the mat; a dog ran 12 laps. Parameter-efficient tuning of models.\n"
    core.train_from_iterator([text * 3, text.upper(), "über naïve café 2024"], trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_tokens(["<think>"])  # a user-defined (not special) added token
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def test_bpe_with_merges_split_and_chat_template_round_trips(tmp_path):
    tokenizer = trained_bpe()
    config = tiny_config("qwen2", vocab_size=len(tokenizer))
    model = transformers.Qwen2ForCausalLM(config).eval()
    report = export_gguf(model, tokenizer, tmp_path / "q.gguf", outtype="f16")
    assert report["tokenizer_pre"] == "qwen2" and report["chat_template"]
    back = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="q.gguf")
    texts = ["the cat sat, 123 laps!", "Über  naïve\n\ncafé <think>x", "<|im_start|>user\nhi"]
    for text in texts:
        assert back.encode(text) == tokenizer.encode(text), text
        assert back.decode(back.encode(text)) == text
    messages = [{"role": "user", "content": "the dog?"}]
    assert back.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    ) == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (back.eos_token_id, back.pad_token_id) == (tokenizer.eos_token_id, 0)
    types = gguf.GGUFReader(tmp_path / "q.gguf").fields["tokenizer.ggml.token_type"].contents()
    think = tokenizer.convert_tokens_to_ids("<think>")
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and types[think] == gguf.TokenType.USER_DEFINED
