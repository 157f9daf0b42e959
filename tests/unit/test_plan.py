"""`plan`: the capacity plan of an inventory, before any host is touched — the example production
inventory, and the seed article's setup (Llama 3.3 70B in 16 bits on one 80 GB GPU), refused."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from roles.errors import FleetConfigError
from roles.plan.fleet import plan_fleet

REPO = Path(__file__).resolve().parents[2]
REVISION = "0" * 40


def run_plan(inventory: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "roles.cli", "plan", str(inventory)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def article_host(**overrides):
    """The article: one H100 80GB, Llama 3.3 70B Instruct, --tensor-parallel-size 1,
    --max-model-len 8192, --gpu-memory-utilization 0.92 (fp16 weights: bf16 is the same size)."""
    data = {
        "vllm_release": "nvidia-vllm-0.32.0", "vllm_accelerator": "nvidia", "vllm_gpu_type": "h100-sxm",
        "vllm_gpu_count": 1, "nvidia_repo_url": "https://cuda-mirror.example/repos", "vllm_model_id": "meta-llama/Llama-3.3-70B-Instruct", "vllm_model_revision": REVISION,
        "vllm_instances": [{"name": "a", "port": 8000}], "vllm_tensor_parallel_size": 1,
        "vllm_max_model_len": 8192, "vllm_gpu_memory_utilization": 0.92, "vllm_dtype": "float16",
    }
    data.update(overrides)
    return data


def test_example_production_inventory_plans_as_a_table():
    result = run_plan("inventories/prod.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["host", "instance", "hardware"]
    rows = {tuple(line.split()[:2]): line for line in lines[2:5]}
    assert "1x h100-sxm  fp8" in rows[("gpu-01.internal", "a")]
    assert "2x h100-sxm  bfloat16" in rows[("gpu-02.internal", "a")]  # tensor-parallel derived
    assert "per million tokens" in result.stdout and "break-even" in result.stdout


def test_article_setup_is_refused_with_the_weight_arithmetic():
    with pytest.raises(FleetConfigError) as err:
        plan_fleet([("gpu-01", article_host())], ["gpu-01"])
    message = str(err.value)
    assert "needs 141.1 GB of weights, 141.1 GB per GPU at tensor-parallel 1" in message
    assert "one h100-sxm holds" in message
    assert "set `vllm_tensor_parallel_size` to 2" in message.split("Fix:")[1] or \
        "tensor_parallel_size` to 2" in message.split("Fix:")[1]
    assert "fp8" in message.split("Fix:")[1]


def test_article_setup_refused_through_the_cli(tmp_path):
    inventory = tmp_path / "article.py"
    inventory.write_text(textwrap.dedent(f"""
        vllm = [("gpu-01", {article_host()!r})]
        lb = ["gpu-01"]
    """))
    result = run_plan(inventory)
    assert result.returncode == 2 and result.stderr.startswith("refused: ") and "141.1 GB" in result.stderr
    assert "Traceback" not in result.stderr


def test_fp8_on_one_h100_fits_and_reports_the_kv_cache_left():
    fleet = plan_fleet([("gpu-01", article_host(vllm_quantization="fp8", vllm_dtype="auto"))], ["gpu-01"])
    fit = fleet.hosts[0].instances[0].fit
    assert fit.quantization == "fp8" and fit.kv_tokens == 11_824
    assert fit.max_model_len == 8192 and fit.max_num_seqs == 1
    assert fit.decode_ceiling_tokens_per_s < 85  # the article's single-stream figure is out of reach


def test_nvidia_host_without_a_driver_repository_is_refused():
    with pytest.raises(FleetConfigError, match="nvidia_repo_url: is not set"):
        plan_fleet([("gpu-01", article_host(nvidia_repo_url=None, vllm_quantization="fp8"))], ["gpu-01"])


def planned_through_the_cli(tmp_path, model_id: str, **overrides) -> str:
    """`vllm-fleet plan` on a one-host inventory serving a hub model whose config.json the project
    keeps in inventories/model_configs/; its table, after asserting it planned."""
    data = article_host(**{"vllm_model_id": model_id, "vllm_tensor_parallel_size": None, "vllm_dtype": "auto",
                           **overrides})
    inventory = tmp_path / "fleet.py"
    inventory.write_text(f"vllm = [('gpu-01', {data!r})]\nlb = ['gpu-01']\n")
    result = run_plan(inventory)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result.stdout


def test_planner_fixes_through_the_cli(tmp_path):
    """Issue 10's planner classes as an operator sees them, each on its published case."""
    # 8: gpt-oss-120b's MXFP4 checkpoint is about 65 GB (model card: 60.8 GiB) and fits one H200.
    gpt_oss = planned_through_the_cli(tmp_path, "openai/gpt-oss-120b", vllm_gpu_type="h200", vllm_max_model_len=None)
    assert "1x h200" in gpt_oss and " 65.2 GB " in gpt_oss, gpt_oss
    # 7: fp8 Llama-3.1-8B on an A100-80GB runs weight-only (Marlin) and fits.
    fp8_a100 = planned_through_the_cli(tmp_path, "meta-llama/Llama-3.1-8B-Instruct", vllm_gpu_type="a100-80gb",
                                       vllm_quantization="fp8")
    assert "1x a100-80gb  fp8" in fp8_a100 and "weight-only" in fp8_a100, fp8_a100
    # 9: gemma-3-27b-it's own config (a multimodal text_config with library defaults) plans.
    gemma = planned_through_the_cli(tmp_path, "google/gemma-3-27b-it", vllm_gpu_type="h200")
    assert gemma.splitlines()[2].startswith("gpu-01"), gemma
    # 10: Qwen2.5-72B in bf16 on 4 x A100-40GB fits with almost no KV cache: a warning, with ways out.
    qwen = planned_through_the_cli(tmp_path, "Qwen/Qwen2.5-72B-Instruct", vllm_gpu_type="a100-40gb",
                                   vllm_gpu_count=4, vllm_tensor_parallel_size=4, vllm_max_model_len=None)
    assert "WARNING gpu-01/a: tight fit:" in qwen and "Ways out:" in qwen, qwen
    # 11: both decode ceilings, labelled: Llama-3.1-8B on one H100 at its full context.
    llama = planned_through_the_cli(tmp_path, "meta-llama/Llama-3.1-8B-Instruct", vllm_max_model_len=None)
    assert "209 tokens/s reading the weights alone" in llama and "101 tokens/s at 131,072 tokens" in llama, llama
