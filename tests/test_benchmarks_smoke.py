"""Every script in benchmarks/ runs its --smoke preset (a tiny model built from a config, one or
two steps, JSON to a temporary path), so that no script goes stale unnoticed. The scripts run in
one subprocess (one import of torch and transformers for all), each through runpy as __main__
with its own argv. What a script cannot run here (llama.cpp, bitsandbytes when absent, trained
SmolLM2 runs) its smoke run refuses by name in its JSON, and the test checks that refusal."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SMOKED = [
    "batching.py", "chunked_ce.py", "combine_experiment.py", "compile_breaks.py", "dora_speed.py",
    "estimate_accuracy.py", "estimate_fsdp_70b.py", "estimate_preference.py", "gguf_export.py",
    "gguf_llamacpp.py", "grpo_rollouts.py", "lora_compile.py", "lora_dropout.py",
    "lora_overhead.py", "lora_vs_full.py", "lowbit_7b.py",
    "lowbit_step.py", "merge_latency.py", "mfu.py", "mixed_batch.py", "nf4_reference.py",
    "pooling_probe.py", "precision.py", "proxy_decoding.py", "proxy_experiment.py",
    "relora_comparison.py", "selection_methods.py", "sql_suite_power.py", "step_profile.py",
]  # fmt: skip
# Smoked by another test (its own processes): the script spawns a 2-process gloo group.
ELSEWHERE = {
    "fsdp_memory.py": "tests/test_sharding.py::test_the_memory_benchmark_smoke_run",
    "fsdp_nf4_7b.py": "tests/test_sharding.py::test_the_7b_nf4_layout_benchmark_halves_the_weights",
    "gpu_check.py": "tests/test_sharding.py::test_the_gpu_check_parses_and_without_cuda_runs_*",
    "serve.py": "tests/test_serve_benchmarks.py (a server in its own process)",
    "serve_load.py": "the load side of serve.py, run by serve.py's smoke run",
    "serve_prefill.py": "tests/test_serve_benchmarks.py (a server in its own process)",
}
NOT_YET: dict[str, str] = {}

DRIVER = r"""
import json, runpy, sys, time, traceback
from pathlib import Path
benchmarks, folder, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
sys.path.insert(0, str(benchmarks))
report = {}
for name in names:
    output = folder / (Path(name).stem + ".json")
    sys.argv = [str(benchmarks / name), "--smoke", "--output", str(output)]
    start = time.perf_counter()
    try:
        runpy.run_path(str(benchmarks / name), run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        error = str(stop.code)
    except BaseException:
        code, error = 1, traceback.format_exc()[-3000:]
    report[name] = {"code": code, "seconds": time.perf_counter() - start,
                    "error": None if code == 0 else error}
    print(f"== {name}: exit {code} in {report[name]['seconds']:.1f} s", flush=True)
(folder / "report.json").write_text(json.dumps(report, indent=2))
"""


def _machines(value):
    """Every dict in a JSON value that records a machine (has cpu_model)."""
    if isinstance(value, dict):
        if "cpu_model" in value:
            yield value
        for inner in value.values():
            yield from _machines(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _machines(inner)


def test_every_benchmark_script_is_smoked_or_named():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - {"common.py"}
    assert scripts == set(SMOKED) | set(ELSEWHERE) | set(NOT_YET)
    for script in SMOKED:  # a smoke preset, not a flag parsed and ignored
        assert (
            "--smoke" in (BENCHMARKS / script).read_text()
            or "parse_with_smoke" in (BENCHMARKS / script).read_text()
        )


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-c", DRIVER, str(BENCHMARKS), str(folder), *SMOKED]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900,
                          cwd=folder)  # fmt: skip
    assert (folder / "report.json").is_file(), done.stderr[-3000:]
    return folder, json.loads((folder / "report.json").read_text())


@pytest.mark.parametrize("script", SMOKED)
def test_smoke_run_writes_its_json_with_the_machine(smoke_runs, script):
    folder, report = smoke_runs
    assert report[script]["code"] == 0, report[script]["error"]
    data = json.loads((folder / (Path(script).stem + ".json")).read_text())
    machines = list(_machines(data))
    assert machines, f"{script}'s JSON records no machine"
    for found in machines:
        assert found["cpu_count"] >= 1 and "load_average" in found and "amx_bf16" in found
        assert found["torch"].split("+")[0] and found["torch_threads"] >= 1


def test_smoke_runs_refuse_by_name_what_cannot_run_here(smoke_runs):
    folder, _ = smoke_runs
    llama = json.loads((folder / "gguf_llamacpp.json").read_text())["results"]
    if importlib.util.find_spec("llama_cpp") is None:
        assert "llama-cpp-python is not installed" in llama["refused"]
        assert llama["f16"]["exported_bytes"] > 0  # the export itself ran
    else:
        assert llama["refused"] is None and llama["f16"]["greedy"]
    nf4 = json.loads((folder / "nf4_reference.json").read_text())
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "bitsandbytes is not installed" in nf4["refused"]
    else:
        assert nf4["refused"] is None
        assert all(r["identical_share"] == 1.0 for r in nf4["results"].values())
    combine = json.loads((folder / "combine_experiment.json").read_text())
    assert "rows not evaluated" in combine["smoke"] and combine["table"]
