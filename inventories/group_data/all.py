# Settings shared by every host of the lab fleet. Every setting, its type and default:
# `python -m roles.cli settings` (declared in roles/settings.py).

vllm_release = "cpu-vllm-0.32.0"
vllm_accelerator = "cpu"
# Built by `make lab` (python -m roles.tiny_model .cache/models/tiny-llama): a random-weight Llama.
vllm_model_path = ".cache/models/tiny-llama"
vllm_served_model_name = "tiny-llama"
vllm_max_model_len = 1024
vllm_max_num_seqs = 16
# Two cores shared by three instances: small caches, no graph compilation (starts in ~25 s).
vllm_kv_cache_bytes = 268435456
vllm_enforce_eager = True
vllm_start_timeout = 300
