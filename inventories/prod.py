"""An example production fleet: `vllm-fleet plan inventories/prod.py` shows its
capacity plan; `pyinfra inventories/prod.py deploys/vllm.py` deploys it.

Two 2-GPU H100 servers serving Llama 3.3 70B behind one nginx host:
- gpu-01 runs two instances, one GPU each, with the weights quantized to fp8 on the fly
  (70B in bf16 is 141 GB: it does not fit one 80 GB GPU, whatever field reports say);
- gpu-02 runs one bf16 instance; its tensor-parallel size is left to the planner (2).
Planning reads the model's config.json from inventories/model_configs/. The model is gated: its
Hub token goes in the secrets folder (`vllm-fleet keys hub inventories/secrets/prod`); lb-01
downloads it once and every GPU host pulls it from there.
"""

from roles.preflight import plan_before_connecting

_FLEET = {
    "vllm_release": "nvidia-vllm-0.32.0",
    "vllm_accelerator": "nvidia",
    "vllm_gpu_type": "h100-sxm",
    "vllm_gpu_count": 2,
    # Your mirror of NVIDIA's CUDA apt repository (the folder holding ubuntu2204/, debian12/).
    "nvidia_repo_url": "https://apt-mirror.internal/cuda/repos",
    "vllm_model_id": "meta-llama/Llama-3.3-70B-Instruct",
    # Replace with the repository commit you evaluated: a deploy never follows a branch.
    "vllm_model_revision": "0000000000000000000000000000000000000000",
    "vllm_served_model_name": "llama-3.3-70b",
    "vllm_max_model_len": 8192,
    "vllm_gpu_memory_utilization": 0.92,
    # Cost arithmetic for the plan: rented GPUs, the article's measured 32-stream throughput.
    "vllm_gpu_hour_price": 2.50,
    "vllm_tokens_per_s": 6400.0,
    "vllm_api_price_per_million": 0.40,
    "vllm_daily_tokens": 500_000_000,
    "ssh_user": "deploy",
    "_sudo": True,
}

vllm = [
    ("gpu-01.internal", {**_FLEET, "vllm_quantization": "fp8", "vllm_instances": [
        {"name": "a", "port": 8001, "gpus": [0]},
        {"name": "b", "port": 8002, "gpus": [1]},
    ]}),
    ("gpu-02.internal", {**_FLEET, "vllm_instances": [{"name": "a", "port": 8001}]}),
]
lb = [("lb-01.internal", {
    "ssh_user": "deploy", "_sudo": True,
    # The LB's back-end IP: the address its connections to the instances come from, which the
    # instance hosts' firewalls let in (an IP: nft would resolve a name only once, at load).
    "vllm_advertise_address": "10.0.0.10",
    # Client keys and what the deploy generates (the instances' internal key, the fleet CA): in a
    # folder that .gitignore lists. Add a client: `vllm-fleet keys add inventories/secrets/prod NAME`.
    "nginx_secrets_dir": "inventories/secrets/prod",
    # Your own certificate for the name clients use; without these two the fleet's CA issues one.
    # "nginx_tls_certificate": "inventories/secrets/prod/api.example.com.pem",
    # "nginx_tls_key": "inventories/secrets/prod/api.example.com.key",
    "nginx_server_name": "api.example.com",
    "nginx_http_redirect_port": 80,
    # The first load balancer is also the artifact cache: the control node sends it each release's
    # wheels and the model once, and the GPU hosts pull them from it. It lets in the fleet's
    # network only (the GPU hosts are named here, and nginx and the firewall allow addresses).
    "cache_allow_from": ["10.0.0.0/24"],
})]

# Plan the fleet while pyinfra loads this file: a configuration that cannot work is refused
# here, before pyinfra connects to any host.
plan_before_connecting(globals())
