"""`training.sharding: fsdp`: FSDP2 under torchrun on two CPU processes (gloo). Each process holds
half of every parameter, both report the same losses, and the adapter gathered at the end equals
the one a single process writes at the same global batch. Checkpoints hold each process's shards
(torch.distributed.checkpoint): a rank killed mid-run resumes to the uninterrupted adapter. Methods
that cannot be sharded are refused through their record, before a model loads."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import adapter_tensors, max_difference
from torch.distributed.checkpoint import FileSystemReader

from peftkit.cli import main
from peftkit.errors import ConfigError
from peftkit.models import load_model
from peftkit.plan import resolve
from peftkit.recipe import load_recipe
from peftkit.training.sharded_checkpoints import check_resume_sharding
from peftkit.training.sharding import float_storage, refuse_8bit, refuse_unsupported

WORKER = Path(__file__).with_name("sharded_worker.py")


def write_recipe(folder: Path, method: str = "{name: lora, rank: 4, dropout: 0.0}") -> Path:
    """A causal-LM recipe on tiny-llama whose 32 training rows make whole global batches of 8."""
    rows = [{"prompt": f"say {'abc'[i % 3]} twice:", "response": f" {'abc'[i % 3]} {'abc'[i % 3]}"}
            for i in range(32)]  # fmt: skip
    train, held_out = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows[:8]))
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        "model: tiny-llama\n"
        f"task: {{type: causal-lm, train_file: {train}, eval_file: {held_out}, max_length: 32}}\n"
        f"method: {method}\n"
        "training: {max_steps: 6, batch_size: 4, learning_rate: 0.02, threads: 1, "
        "logging_steps: 1, eval_batch_size: 8, sharding: fsdp}\n"
        f"output_dir: {folder / 'two'}\n"
    )
    return recipe


def run_worker(
    folder: Path,
    processes: int,
    *arguments: str,
    kill: str | None = None,
    launcher: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """sharded_worker.py (peftkit train, losses recorded) on one process or under torchrun (or
    the `launcher` given); `kill` "RANK:STEP" makes that process SIGKILL itself as it starts that
    step."""
    python = Path(sys.executable)
    if launcher is None:
        launcher = [str(python)]
    if processes > 1 and launcher == [str(python)]:
        torchrun = shutil.which("torchrun", path=str(python.parent))
        launcher = [torchrun, "--standalone", "--nproc_per_node", str(processes)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]),
    }
    if kill is not None:
        env["PEFTKIT_TEST_KILL"] = kill
    command = [*launcher, str(WORKER), str(folder), "train", *arguments]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


SINGLE_PROCESS = ["--set", "training.batch_size=8", "--set", "training.sharding=none"]
LORA = "{name: lora, rank: 4, dropout: 0.0}"
CHECKPOINTS = ["--set", "training.save_steps=2"]  # checkpoints 2, 4 and 6


def train_two_and_one(folder: Path, section: str, *arguments: str) -> None:
    """The recipe on 2 sharded processes of batch 4 (into folder/two) and on one process of
    batch 8 (folder/one), each process's losses in folder/ranks and folder/single."""
    recipe = write_recipe(folder, section)
    two = run_worker(folder / "ranks", 2, str(recipe), *arguments)
    assert two.returncode == 0, two.stderr[-3000:]
    single_process = ["--output-dir", str(folder / "one"), *arguments, *SINGLE_PROCESS,
                      "--set", "training.save_steps=0"]  # fmt: skip
    one = run_worker(folder / "single", 1, str(recipe), *single_process)
    assert one.returncode == 0, one.stderr[-3000:]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRA trained sharded with checkpoints every 2 steps, uninterrupted, and on one process."""
    folder = tmp_path_factory.mktemp("lora")
    train_two_and_one(folder, LORA, *CHECKPOINTS)
    return folder


def check_two_match_one(folder: Path, section: str) -> None:
    """The sharded run of train_two_and_one trained as the single process did."""
    summary = json.loads((folder / "two" / "summary.json").read_text())
    assert (summary["processes"], summary["sharding"], summary["steps"]) == (2, "fsdp", 6)
    assert summary["metric_after"] < summary["metric_before"]  # eval loss: it trained
    ranks = [json.loads((folder / "ranks" / f"losses-{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((folder / "single" / "losses-0.json").read_text())
    # each process held half of the model's parameter elements once sharded
    for rank in ranks:
        held = rank["parameters"]
        if summary["quantize"] is None:  # 4-bit weights count 8 codes per stored element
            assert held["total"] == summary["total_parameters"]
        assert abs(held["local"] - held["total"] / 2) <= 0.01 * held["total"]
    assert single["parameters"] == {}  # one process: nothing sharded
    # both ranks report the same loss at every step, the single process's within rounding
    assert [r["step"] for r in ranks[0]["losses"]] == list(range(1, 7))
    assert ranks[0]["losses"] == ranks[1]["losses"]
    for sharded, whole in zip(ranks[0]["losses"], single["losses"], strict=True):
        assert sharded["loss"] == pytest.approx(whole["loss"], abs=1e-5)
    # the adapter gathered from the shards, in the method's files, equals one process's
    gathered, reference = adapter_tensors(folder / "two"), adapter_tensors(folder / "one")
    assert max_difference(gathered, reference) <= 1e-6
    if "lora" in section:
        config = json.loads((folder / "two" / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"  # PEFT's own files


def test_two_sharded_processes_train_the_lora_adapter_of_one_process(lora_runs: Path) -> None:
    check_two_match_one(lora_runs, LORA)
    # each checkpoint holds the adapter gathered whole: the last one is the final adapter
    last = lora_runs / "two" / "checkpoints" / "checkpoint-6"
    final = adapter_tensors(lora_runs / "two")
    assert max_difference(load_file(str(last / "adapter_model.safetensors")), final) == 0.0


def test_accelerate_launch_shards_as_torchrun_does(lora_runs: Path, tmp_path: Path) -> None:
    """`accelerate launch` with the repository's DDP config (no FSDP of its own) and
    `sharding: fsdp` trains the adapter one process of the same global batch trains."""
    recipe = write_recipe(tmp_path, LORA)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    config = Path(__file__).parents[1] / "examples" / "accelerate" / "ddp.yaml"
    launcher = [accelerate, "launch", "--config_file", str(config)]
    done = run_worker(tmp_path / "ranks", 2, str(recipe), launcher=launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["processes"], summary["sharding"], summary["steps"]) == (2, "fsdp", 6)
    for rank in (0, 1):  # each process held half of the parameter elements: sharded
        held = json.loads((tmp_path / "ranks" / f"losses-{rank}.json").read_text())["parameters"]
        assert abs(held["local"] - held["total"] / 2) <= 0.01 * held["total"]
    gathered = adapter_tensors(tmp_path / "two")
    assert max_difference(gathered, adapter_tensors(lora_runs / "one")) <= 1e-6


def test_two_sharded_processes_fine_tune_fully_as_one_process(tmp_path: Path) -> None:
    train_two_and_one(tmp_path, "{name: full}", "--set", "training.learning_rate=0.001")
    check_two_match_one(tmp_path, "{name: full}")


def test_a_rank_killed_mid_run_resumes_to_the_uninterrupted_adapter(
    lora_runs: Path, tmp_path: Path
) -> None:
    """Rank 1 is SIGKILLed as step 5 starts (checkpoint-4 complete); `--resume` on 2 processes
    reads each process's shards of the optimizer back (DCP) and ends with the adapter of the
    uninterrupted sharded run and of one process of the same global batch."""
    recipe = write_recipe(tmp_path, LORA)
    killed = run_worker(tmp_path / "killed", 2, str(recipe), *CHECKPOINTS, kill="1:5")
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    checkpoints = tmp_path / "two" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert not (tmp_path / "two" / "summary.json").exists()
    shards = checkpoints / "checkpoint-4" / "sharded"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # the optimizer state is stored as each process held it: AdamW's moments in two halves
    metadata = FileSystemReader(str(shards)).read_metadata().state_dict_metadata
    moments = [name for name in metadata if name.endswith(".exp_avg")]
    assert len(moments) == 8  # q and v projections' A and B, in 2 layers
    for name in moments:
        chunks = metadata[name].chunks
        assert len(chunks) == 2
        assert sum(c.sizes[0] for c in chunks) == metadata[name].size[0]

    resumed = run_worker(tmp_path / "resumed", 2, str(recipe), *CHECKPOINTS, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4")
    assert (summary["steps"], summary["sharding"]) == (6, "fsdp")
    losses = json.loads((tmp_path / "resumed" / "losses-0.json").read_text())["losses"]
    uninterrupted = json.loads((lora_runs / "ranks" / "losses-0.json").read_text())["losses"]
    assert [r["step"] for r in losses] == [5, 6]
    for after, whole in zip(losses, uninterrupted[4:], strict=True):
        assert after["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    adapter = adapter_tensors(tmp_path / "two")
    assert max_difference(adapter, adapter_tensors(lora_runs / "two")) <= 1e-6
    assert max_difference(adapter, adapter_tensors(lora_runs / "one")) <= 1e-6


def test_qlora_sharded_holds_half_of_the_nf4_weights_and_trains_as_one_process(
    tmp_path: Path,
) -> None:
    """An NF4 base (QLoRA) sharded over 2 gloo processes: its packed 4-bit weights re-stored in
    a float dtype (bitsandbytes' quant_storage) are sharded like the others, so each process
    holds half; the adapter is one process's (its NF4 weights in uint8) within 1e-6."""
    nf4 = ["--set", "base.quantize=nf4"]
    train_two_and_one(tmp_path, LORA, *nf4)
    check_two_match_one(tmp_path, LORA)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["quantize"] == "nf4"


def test_float_storage_keeps_the_packed_nf4_bytes_and_the_outputs() -> None:
    model, _ = load_model("tiny-llama", "causal-lm", quantize="nf4")
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layer = model.model.layers[0].self_attn.q_proj
    packed = layer.weight.data.clone()
    assert packed.dtype == torch.uint8
    assert float_storage(model, torch.float32) == 7 * 2  # q k v o gate up down, 2 layers
    assert layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight.data.view(torch.uint8).reshape(packed.shape), packed)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert float_storage(model, torch.float32) == 0  # already stored so


def test_an_int8_base_is_refused_sharded() -> None:
    model, _ = load_model("tiny-llama", "causal-lm", quantize="int8")
    with pytest.raises(ConfigError, match="cannot shard an int8 base .* Use base.quantize: nf4"):
        refuse_8bit(model)


def test_two_nodes_with_a_c10d_rendezvous_train_one_adapter(tmp_path: Path) -> None:
    """Two torchrun agents of one process each, meeting at a c10d rendezvous on 127.0.0.1 (two
    nodes on one machine), train and save one adapter: a single process's."""
    recipe = write_recipe(tmp_path)
    python = Path(sys.executable)
    torchrun = shutil.which("torchrun", path=str(python.parent))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "peftkit-test", "-m",
               "peftkit.cli", "train", str(recipe)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    assert sum(out.count("summary.json and the adapter") for out, _ in outputs) == 1
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["processes"], summary["sharding"]) == (2, "fsdp")
    one = run_worker(tmp_path / "single", 1, str(recipe), "--output-dir", str(tmp_path / "one"),
                     *SINGLE_PROCESS)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    gathered, reference = adapter_tensors(tmp_path / "two"), adapter_tensors(tmp_path / "one")
    assert max_difference(gathered, reference) <= 1e-6


@pytest.mark.parametrize(
    ("section", "reason"),
    [
        ("{name: child_tuning, mode: F}", "masks and Fisher pass"),
        ("{name: relora}", "merges its adapters"),
        ("{name: adalora}", "rank allocation"),
    ],
)
def test_methods_that_cannot_be_sharded_are_refused_before_loading(
    tmp_path: Path, section: str, reason: str, capsys
) -> None:
    recipe = write_recipe(tmp_path, section)
    with pytest.raises(ConfigError, match=f"cannot train sharded \\(fsdp\\): .*{reason}"):
        resolve(load_recipe(recipe))
    assert main(["train", str(recipe)]) == 2
    assert "cannot train sharded" in capsys.readouterr().err
    assert not (tmp_path / "two" / "summary.json").exists()
    resolve(load_recipe(recipe, ["training.sharding=none"]))  # DDP trains it


def test_sharding_is_none_or_fsdp(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path)
    with pytest.raises(ConfigError, match="sharding must be one of none, fsdp, got 'zero3'"):
        load_recipe(recipe, ["training.sharding=zero3"])
    with_checkpoints = load_recipe(recipe, ["training.save_steps=2"])
    refuse_unsupported(with_checkpoints, None)  # peftkit's trainer checkpoints the shards
    with pytest.raises(ConfigError, match="not supported with training.sharding: fsdp for task "
                       "type 'causal-lm' \\(it trains with its own trainer"):  # fmt: skip
        refuse_unsupported(with_checkpoints, None, own_trainer=True)


def test_a_checkpoint_resumes_only_with_the_sharding_that_wrote_it(tmp_path: Path) -> None:
    sharded_checkpoint, whole_checkpoint = tmp_path / "checkpoint-4", tmp_path / "checkpoint-2"
    (sharded_checkpoint / "sharded").mkdir(parents=True)
    whole_checkpoint.mkdir()
    check_resume_sharding(sharded_checkpoint, sharded=True)
    check_resume_sharding(whole_checkpoint, sharded=False)
    with pytest.raises(ConfigError, match="written by a sharded run .* resume it with "
                       "training.sharding: fsdp under torchrun"):  # fmt: skip
        check_resume_sharding(sharded_checkpoint, sharded=False)
    with pytest.raises(ConfigError, match="written by an unsharded run .* training.sharding: none"):
        check_resume_sharding(whole_checkpoint, sharded=True)


def test_the_7b_nf4_layout_benchmark_halves_the_weights(tmp_path: Path) -> None:
    """benchmarks/fsdp_nf4_7b.py (meta device, seconds): Llama-2-7B's stored NF4 weights, counted
    in closed form from its shapes, are split in half between the 2 processes."""
    output = tmp_path / "fsdp_nf4_7b.json"
    script = Path(__file__).parents[1] / "benchmarks" / "fsdp_nf4_7b.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), "--smoke", "--output", str(output)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())["results"]
    hidden, inner, layers, vocab = 4096, 11008, 32, 32000  # Llama-2-7B
    quantized = layers * (4 * hidden * hidden + 3 * hidden * inner)  # attention and MLP linears
    bf16 = 2 * vocab * hidden + (2 * layers + 1) * hidden  # embeddings, output layer, norms
    assert results["quantized_weights"] == quantized
    assert results["whole_gib"] * 2**30 == quantized // 2 + 2 * bf16  # half a byte per NF4 code
    for share in results["held_over_whole"]:
        assert share == pytest.approx(0.5, abs=0.005)


def test_the_memory_benchmark_smoke_run(tmp_path: Path) -> None:
    """benchmarks/fsdp_memory.py --smoke: FSDP holds about half of DDP's tensors per process
    (full fine-tuning: parameters, gradients, AdamW state), with the losses of one process."""
    output = tmp_path / "fsdp_memory.json"
    script = Path(__file__).parents[1] / "benchmarks" / "fsdp_memory.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), "--smoke", "--output", str(output)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())["results"]
    ddp, fsdp = results["ddp"]["memory"], results["fsdp"]["memory"]
    # DDP: every process holds the whole model: parameters, as many gradients, AdamW's m and v
    assert ddp[0] == ddp[1]
    assert ddp[0]["gradients"] == ddp[0]["parameters"]
    assert ddp[0]["optimizer"] == 2 * ddp[0]["parameters"]
    assert sum(m["parameters"] for m in fsdp) == pytest.approx(ddp[0]["parameters"], rel=0.01)
    assert results["fsdp_over_ddp"] <= 0.55
    for arm in ("ddp", "fsdp"):
        assert results[arm]["ranks_agree"]
        assert results[arm]["max_loss_difference"] <= 1e-5
        assert len(results[arm]["losses"]) == 3


def test_the_gpu_check_parses_and_without_cuda_runs_nothing(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh is for a GPU machine: here only its syntax, its Python half's
    subcommands, and its refusal with CUDA hidden (nothing run, no JSON written)."""
    benchmarks = Path(__file__).parents[1] / "benchmarks"
    syntax = subprocess.run(["bash", "-n", str(benchmarks / "gpu_check.sh")], capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    helper = [sys.executable, str(benchmarks / "gpu_check.py")]
    usage = subprocess.run([*helper, "--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0, usage.stderr
    assert "{cuda-present,fsdp,nf4,train,serve,merge}" in usage.stdout
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable,
           "OUT": str(tmp_path)}  # fmt: skip
    done = subprocess.run(["bash", str(benchmarks / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "sees no CUDA device" in done.stderr and "nothing was run" in done.stderr
    assert not list(tmp_path.iterdir())
