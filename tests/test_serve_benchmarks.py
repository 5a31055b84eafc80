"""The serving benchmarks' smoke runs (tiny-llama, a few seconds each): the soak of valid and
hostile requests answers no 5xx and every valid answer equals the same request's answer alone;
the chunked-prefill benchmark keeps its streams streaming through a long prompt's admission and
answers the long request in full. Timings are recorded, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def run(script: str, *flags: str) -> None:
    """Run a benchmark script in a child process; fail with its error output if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(BENCHMARKS / script), *flags]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_soak_smoke_run_answers_no_5xx_and_each_answer_as_alone(tmp_path: Path) -> None:
    output = tmp_path / "soak.json"
    run("serve.py", "--smoke", "--rounds", "0", "--soak-seconds", "3",
        "--max-prefill-tokens", "64", "--output", str(output))  # fmt: skip
    soak = json.loads(output.read_text())["soak"]
    assert soak["five_xx"] == 0 and soak["valid_failures"] == []
    assert soak["answers_checked_alone"] == soak["counts"]["valid ok"] > 0
    assert soak["answers_differing_alone"] == 0, soak["differing"]
    assert "malformed not refused with a 4xx error body" not in soak["counts"]
    assert soak["rss_mib_samples"]


def test_the_prefill_smoke_run_streams_through_a_long_prompt(tmp_path: Path) -> None:
    output = tmp_path / "prefill.json"
    run("serve_prefill.py", "--smoke", "--output", str(output))
    record = json.loads(output.read_text())
    runs = [(r["max_prefill_tokens"], r["long_max_tokens"]) for r in record["results"]]
    assert runs == [(100000, 1), (16, 4)]
    for result in record["results"]:
        assert result["long_completion_tokens"] == result["long_max_tokens"]
        assert result["gaps_before"] > 0 and result["gaps_during"] > 0
    assert record["machine"]["torch"]
