"""The lab's stand-in fallback provider, as its host-side script derives it from the fleet's
instance on that host: the same release, model and flags, served under another name, on loopback,
with its own key; nginx speaks TLS in front."""

import shlex

from roles.lab import provider_host

ENV = ('# Managed by vllm-fleet; rendered from the inventory. Changes are overwritten.\n'
       'ENGINE_ARGS="--model /var/lib/vllm-fleet/models/tiny-llama-f1bd7e6330f7 --served-model-name tiny-llama '
       '--host 10.213.7.12 --port 8001 --max-num-seqs 16 --enforce-eager"\n'
       'VLLM_API_KEY=fleet-internal-key\nVLLM_CPU_OMP_THREADS_BIND="1"\n')


def test_the_engine_is_the_instances_under_another_name_on_loopback(tmp_path, monkeypatch):
    (tmp_path / "a.env").write_text(ENV)
    monkeypatch.setattr(provider_host, "FLEET_ENV", str(tmp_path / "{}.env"))
    env = dict(line.split("=", 1) for line in provider_host.engine_env("a", "lab-provider", 9001, "pk-1").splitlines())
    args = shlex.split(env["ENGINE_ARGS"])[0].split()
    assert args == ["--model", "/var/lib/vllm-fleet/models/tiny-llama-f1bd7e6330f7", "--served-model-name",
                    "lab-provider", "--host", "127.0.0.1", "--port", "9001", "--max-num-seqs", "16", "--enforce-eager"]
    assert env["VLLM_API_KEY"] == "pk-1" and env["VLLM_CPU_OMP_THREADS_BIND"] == '"1"'
    assert "fleet-internal-key" not in "".join(env.values())


def test_nginx_speaks_tls_in_front_of_the_engine():
    conf = provider_host.nginx_conf(8443, 9001)
    assert "listen 8443 ssl;" in conf and "proxy_pass http://127.0.0.1:9001;" in conf
    assert "proxy_buffering off;" in conf and f"ssl_certificate_key {provider_host.ETC}/provider.key;" in conf
