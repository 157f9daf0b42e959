"""The capacity plan against real vLLM (CPU) in the lab: the KV-cache size vLLM reports at
start-up must match the plan's prediction within 2%, for three model/cache settings.

The first setting is the deployed fleet itself (read from its journal); the other two start
vLLM once each on a lab host with the release venv, read the line, and stop it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from roles.lab import tiny_model
from roles.lab.hosts import ssh_command
from roles.plan.capacity import Deployment, plan_capacity
from roles.plan.model import ModelArch
from tests.lab.labkit import REPO, bring_up_lab, run_deploy

pytestmark = pytest.mark.lab

KV_LINE = re.compile(r"CPU KV cache size: ([\d,]+) tokens")
TOLERANCE = 0.02


def ssh(host: str, command: str, timeout: int = 300) -> str:
    proc = subprocess.run(ssh_command(host) + [command], capture_output=True, text=True, timeout=timeout)
    return proc.stdout + proc.stderr


def reported_tokens(text: str) -> int:
    match = KV_LINE.search(text)
    assert match, text[-3000:]
    return int(match.group(1).replace(",", ""))


def predicted_tokens(model_dir: Path, kv_bytes: int, dtype: str = "auto") -> int:
    fit = plan_capacity(ModelArch.load(model_dir), Deployment(weight_dtype=dtype, cpu_kv_cache_bytes=kv_bytes,
                                                             max_model_len=1024))
    return fit.kv_tokens


def start_and_read_kv_line(host: str, model_dir: str, kv_bytes: int, extra: str = "") -> int:
    """Start vLLM in the foreground on the host until it logs its KV cache size, then stop it."""
    command = (
        "cd /tmp && rm -f kvprobe.log && (setsid env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 "
        f"VLLM_CPU_OMP_THREADS_BIND=0 /opt/vllm-fleet/current/bin/python -m vllm.entrypoints.openai.api_server "
        f"--model {model_dir} --port 18555 --host 127.0.0.1 --enforce-eager --max-model-len 1024 "
        f"--kv-cache-memory-bytes {kv_bytes} {extra} > kvprobe.log 2>&1 & echo $! > kvprobe.pid); "
        # Bounded wait for the line, then stop the whole process group (API server and engine).
        "for i in $(seq 240); do grep -m1 'CPU KV cache size' kvprobe.log && break; sleep 1; done; "
        "kill -- -$(cat kvprobe.pid); sleep 2; kill -9 -- -$(cat kvprobe.pid) 2>/dev/null; tail -5 kvprobe.log; true")
    return reported_tokens(ssh(host, command))


@pytest.fixture(scope="module")
def lab():
    return bring_up_lab()


def check(label: str, reported: int, predicted: int) -> None:
    error = abs(reported - predicted) / reported
    print(f"\n{label}: vLLM reports {reported:,} KV tokens, the plan predicts {predicted:,} ({error:.2%} apart)")
    assert error <= TOLERANCE


def test_deployed_instance_matches_plan(lab):
    """Setting 1: the lab fleet as deployed (tiny Llama, bf16 KV, 256 MiB)."""
    assert run_deploy().returncode == 0  # the fleet must be deployed; a no-change run if it is
    host = lab["hosts"][1]["name"]
    journal = ssh(host, "journalctl -u vllm@a --no-pager -o cat | grep 'CPU KV cache size' | tail -1")
    check("deployed tiny-llama bf16, 256 MiB", reported_tokens(journal),
          predicted_tokens(REPO / ".cache" / "models" / "tiny-llama", 256 << 20))


def test_gqa_model_matches_plan(lab, tmp_path):
    """Setting 2: another architecture (3 layers, 2 KV heads for 4 query heads), 96 MiB."""
    model = tiny_model.build(tmp_path / "tiny-gqa", num_hidden_layers=3, num_key_value_heads=2)
    host = lab["hosts"][1]["name"]
    remote = "/tmp/tiny-gqa"
    subprocess.run(["scp", *ssh_command(host)[1:-1], "-r", str(model), f"{ssh_command(host)[-1]}:{remote}"],
                   check=True, capture_output=True)
    ssh(host, f"chmod -R a+rX {remote}")
    check("tiny-llama GQA (3 layers, 2 KV heads), 96 MiB", start_and_read_kv_line(host, remote, 96 << 20),
          predicted_tokens(model, 96 << 20))


def test_float32_cache_of_odd_size_matches_plan(lab):
    """Setting 3: float32 weights and KV cache, a size that is not a whole number of blocks."""
    host = lab["hosts"][1]["name"]
    model_dir = ssh(host, "ls -d /var/lib/vllm-fleet/models/tiny-llama-*").split()[0]
    check("tiny-llama float32, 300,000,000 bytes",
          start_and_read_kv_line(host, model_dir, 300_000_000, "--dtype float32"),
          predicted_tokens(REPO / ".cache" / "models" / "tiny-llama", 300_000_000, dtype="float32"))
