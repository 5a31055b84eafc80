"""The server's engine without HTTP, driven turn by turn: rows that join a running batch and leave
it at different steps each decode the text `generate` gives them alone, while the batch's cache
stays exactly as long as its longest live row; sampling follows its definitions; text is released
as it becomes final."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch
from serve_support import MODEL, make_adapter
from transformers import DynamicCache

import peftkit.api as api
from peftkit.decoding.generate import generate
from peftkit.methods.lora.rows import ROW_ADAPTERS
from peftkit.models import load_model
from peftkit.serve import kv
from peftkit.serve.engine import Engine, Limits
from peftkit.serve.rows import Row
from peftkit.serve.sampling import Sampling, TextStream, next_token, nucleus


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(root / "a", 1, 2), "b": make_adapter(root / "b", 2, 4)}


def engine_with(folders, max_batch, max_prefill_tokens=512):
    """An engine (no thread: the test turns the loop) serving adapters a and b."""
    model, tokenizer = load_model(MODEL, "causal-lm")
    for name, folder in folders.items():
        model = ROW_ADAPTERS.add(model, name, folder)
    limits = Limits(max_batch=max_batch, max_queue=16, max_prefill_tokens=max_prefill_tokens)
    engine = Engine(model, tokenizer, limits)
    engine.row_adapters, engine.adapters = ROW_ADAPTERS, set(folders)
    return engine, tokenizer


def check_cache_fits_the_rows(engine):
    """Every row's mask covers exactly its own tokens, right-aligned; no column is unused."""
    if not engine.rows:
        return
    fed = [len(row.prompt) + row.generated - 1 for row in engine.rows]  # the last is not fed yet
    assert engine.mask.shape[1] == max(fed)
    assert engine.mask.sum(dim=1).tolist() == fed
    assert all(engine.mask[i, -n:].all() for i, n in enumerate(fed))
    assert engine.cache.get_seq_length() == max(fed)
    assert engine.positions.tolist() == fed


@pytest.mark.parametrize("max_prefill_tokens", [512, 5])  # whole prompts; chunks of a few
def test_rows_joining_and_leaving_decode_as_each_would_alone(folders, max_prefill_tokens):
    engine, tokenizer = engine_with(folders, max_batch=3, max_prefill_tokens=max_prefill_tokens)
    texts = defaultdict(str)
    cases = [  # (adapter, prompt, max_tokens, turn at which it is submitted)
        ("a", "a longer prompt than the others, to pad", 14, 0),
        ("b", "short", 4, 3),
        (None, "the base alone", 9, 3),
        ("a", "waits for a place", 6, 3),  # max_batch 3: it joins once a row leaves
        ("b", "late", 5, 8),
    ]
    rows = []
    for turn in range(60):
        for index, (adapter, prompt, n, start) in enumerate(cases):
            if start == turn:

                def emit(kind, payload, index=index):
                    texts[index] += payload if kind == "text" else ""

                ids = tokenizer(prompt)["input_ids"]
                rows.append(Row(ids, adapter, Sampling(max_tokens=n, temperature=0), emit))
                engine.submit([rows[-1]])
        engine.run_once()
        check_cache_fits_the_rows(engine)
        assert len(engine.rows) <= 3
    assert all(row.finished for row in rows) and engine.stats.mixed_steps > 0
    if max_prefill_tokens < 512:  # the long prompts took several chunks
        assert engine.stats.prefill_chunks > engine.stats.prefills
    for index, (adapter, prompt, n, _) in enumerate(cases):
        model = load_model(MODEL, "causal-lm")[0]
        alone = api.load(model, folders[adapter]) if adapter else model
        assert texts[index] == generate(alone.eval(), tokenizer, [prompt], max_new_tokens=n)[0].text


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    torch.manual_seed(0)
    for _ in range(20):
        logits, top_p = torch.randn(50), float(torch.rand(()))
        probabilities = logits.softmax(-1)
        kept, mass = set(), 0.0
        for token in probabilities.argsort(descending=True).tolist():
            if mass >= top_p:
                break
            kept.add(token)
            mass += float(probabilities[token])
        got = nucleus(logits, top_p)
        assert set(torch.isfinite(got).nonzero().flatten().tolist()) == kept
        torch.testing.assert_close(got[list(kept)], logits[list(kept)])


def test_sampling_draws_from_the_tempered_distribution_and_a_seed_repeats_it():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    sampling = Sampling(max_tokens=1, temperature=0.7, seed=3)
    generator = sampling.generator(torch.device("cpu"))
    counts = Counter(next_token(logits, sampling, generator) for _ in range(4000))
    expected = (logits / 0.7).softmax(-1)
    for token in range(4):
        assert abs(counts[token] / 4000 - float(expected[token])) < 0.03
    first = [
        next_token(logits, sampling, sampling.generator(torch.device("cpu"))) for _ in range(3)
    ]
    assert len(set(first)) == 1
    assert next_token(logits, Sampling(max_tokens=1, temperature=0), None) == 0


def test_text_is_released_whole_and_stops_at_a_stop_string():
    _, tokenizer = load_model(MODEL, "causal-lm")
    ids = tokenizer("héllo, wor", add_special_tokens=False)["input_ids"]
    assert len(ids) > len("héllo, wor")  # byte-level: é takes two tokens
    stream = TextStream(tokenizer)
    pieces = [stream.add(token) for token in ids] + [stream.finish()]
    assert "".join(pieces) == "héllo, wor" and "\ufffd" not in "".join(pieces)
    stopping = TextStream(tokenizer, stop=("lo, w",))
    pieces = []
    for token in ids:
        pieces.append(stopping.add(token))
        if stopping.stopped:
            break
    assert "".join(pieces) == "hél" and stopping.finish() == ""


def test_stop_strings_cut_at_the_first_found_whatever_the_token_boundaries():
    _, tokenizer = load_model(MODEL, "causal-lm")
    generator = torch.Generator().manual_seed(0)
    for case in range(60):
        ids = torch.randint(3, 300, (40,), generator=generator).tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        start = int(torch.randint(0, max(1, len(text) - 6), (1,), generator=generator))
        width = int(torch.randint(1, 6, (1,), generator=generator))
        # A piece of the text, one with a repeated start (KMP's fallback), one that never occurs.
        stops = (text[start : start + width] or "x", text[start] * 3 + "~", "never-there")
        stops = stops[: 1 + case % 3]
        stream, pieces = TextStream(tokenizer, stop=stops), []
        for token in ids:
            pieces.append(stream.add(token))
            if stream.stopped:
                break
        pieces.append(stream.finish())
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        assert "".join(pieces) == (text[: min(found)] if found else text), (ids, stops)
        assert stream.stopped == bool(found)


def test_a_long_stop_string_costs_each_token_its_new_characters_only():
    import time

    class OneLetter:  # decodes n tokens to n letters 'a', at C speed
        def decode(self, ids, skip_special_tokens=True):
            return "a" * len(ids)

    # Longer than requests may send (MAX_STOP_CHARS): the matching itself must be linear.
    stop = "a" * 49_999 + "b"
    stream = TextStream(OneLetter(), stop=(stop,))
    started = time.perf_counter()
    for _ in range(2000):  # the text is always a prefix of the stop string: all held back
        assert stream.add(0) == ""
    elapsed = time.perf_counter() - started
    # Matching every suffix of the text against every prefix of the stop (the old check) took
    # about 25 ms a token here, about 50 s in all.
    assert elapsed < 1.0, elapsed
    assert stream.finish() == "a" * 2000


def test_a_long_prompt_is_prefilled_in_chunks_while_the_running_rows_decode(folders):
    engine, tokenizer = engine_with(folders, max_batch=4, max_prefill_tokens=8)
    texts = defaultdict(str)

    def row(index, adapter, prompt, n):
        def emit(kind, payload):
            texts[index] += payload if kind == "text" else ""

        ids = tokenizer(prompt)["input_ids"]
        sampling = Sampling(max_tokens=n, temperature=0, ignore_eos=True)
        return Row(ids, adapter, sampling, emit)

    running = row(0, "a", "short", 30)
    engine.submit([running])
    engine.run_once()
    long_prompt = "a prompt that goes on " * 8  # about 50 tokens: seven chunks of 8
    late = row(1, "b", long_prompt, 4)
    engine.submit([late])
    chunks = 0
    while late.generated == 0:
        before = running.generated
        engine.run_once()
        chunks += 1
        assert running.generated == before + 1  # the stream got its token every turn
        check_cache_fits_the_rows(engine)
    assert chunks == -(-len(late.prompt) // 8)
    while not (running.finished and late.finished):
        engine.run_once()
    # Each as it decodes alone, its prompt in one forward.
    whole, _ = engine_with(folders, max_batch=4)
    for index, (adapter, prompt, n) in enumerate([("a", "short", 30), ("b", long_prompt, 4)]):
        alone = row(10 + index, adapter, prompt, n)
        whole.submit([alone])
        while not alone.finished:
            whole.run_once()
        assert texts[index] == texts[10 + index] and texts[index]


def test_a_row_that_ends_at_its_first_token_never_joins_the_running_batch(folders, monkeypatch):
    engine, tokenizer = engine_with(folders, max_batch=4, max_prefill_tokens=16)
    joins = []
    join = kv.join
    monkeypatch.setattr(kv, "join", lambda *args: joins.append(1) or join(*args))
    texts = defaultdict(str)

    def row(index, prompt, n):
        def emit(kind, payload):
            texts[index] += payload if kind == "text" else ""

        sampling = Sampling(max_tokens=n, temperature=0, ignore_eos=True)
        return Row(tokenizer(prompt)["input_ids"], "a", sampling, emit)

    running = row(0, "short", 40)
    engine.submit([running])
    engine.run_once()
    scored = row(1, "a long prompt to score " * 3, 1)  # lm-eval's scoring request: 1 token
    engine.submit([scored])
    while not scored.finished:
        engine.run_once()
        check_cache_fits_the_rows(engine)
    assert joins == [] and engine.rows == [running]  # the running cache was never padded
    assert engine.mask.shape[1] == len(running.prompt) + running.generated - 1
    continued = row(2, "a long prompt to score " * 3, 3)
    engine.submit([continued])
    while not (running.finished and continued.finished):
        engine.run_once()
        check_cache_fits_the_rows(engine)
    assert joins == [1]
    model = api.load(load_model(MODEL, "causal-lm")[0], folders["a"]).eval()
    for index, n in [(1, 1), (2, 3)]:
        prompt = "a long prompt to score " * 3
        assert texts[index] == generate(model, tokenizer, [prompt], max_new_tokens=n)[0].text


def test_growing_cache_layers_append_in_place_and_equal_concatenation():
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 5, 4, generator=generator), torch.randn(3, 2, 5, 4)
    layer = kv.GrowingLayer(keys, values)
    expected_keys, expected_values = keys, values
    pointers = set()
    for step in range(40):
        new_keys = torch.randn(3, 2, 1 + step % 3, 4, generator=generator)
        new_values = torch.randn(3, 2, 1 + step % 3, 4, generator=generator)
        got_keys, got_values = layer.update(new_keys, new_values)
        expected_keys = torch.cat([expected_keys, new_keys], dim=2)
        expected_values = torch.cat([expected_values, new_values], dim=2)
        assert torch.equal(got_keys, expected_keys) and torch.equal(got_values, expected_values)
        assert layer.get_seq_length() == expected_keys.shape[2]
        pointers.add(got_keys.data_ptr())
    assert len(pointers) < 10  # most appends wrote into the buffer they found (no copy)
    # Rows leave and padding columns are cut: the next append starts from what is left.
    cache = DynamicCache()
    cache.layers = [layer]
    mask = torch.ones(3, expected_keys.shape[2], dtype=torch.long)
    mask[1:, :7] = 0
    cache, mask = kv.keep_rows(cache, mask, torch.tensor([1, 2]))
    assert mask.shape[1] == expected_keys.shape[2] - 7
    new_keys, new_values = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    got_keys, got_values = layer.update(new_keys, new_values)
    assert torch.equal(got_keys, torch.cat([expected_keys[1:, :, 7:], new_keys], dim=2))
    assert torch.equal(got_values, torch.cat([expected_values[1:, :, 7:], new_values], dim=2))


def test_joining_places_both_sides_right_aligned_with_zeros_on_the_left():
    short = kv.GrowingLayer(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    long = kv.GrowingLayer(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
    old_keys, new_keys = short.keys.clone(), long.keys.clone()
    running, joining = DynamicCache(), DynamicCache()
    running.layers, joining.layers = [short], [long]
    mask = torch.ones(2, 3, dtype=torch.long)
    mask[0, 0] = 0
    cache, joined = kv.join(running, mask, joining, torch.ones(1, 6, dtype=torch.long))
    keys = cache.layers[0].keys
    assert keys.shape == (3, 2, 6, 4)
    assert torch.equal(keys[:2, :, 3:], old_keys) and torch.equal(keys[2:], new_keys)
    assert not keys[:2, :, :3].any()  # padding: zeros (finite), masked out
    assert joined.tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1], [1] * 6]
