"""Run ON the last lab host (as `python3 -c` text, the system's python3) to set up or take away the
lab's stand-in fallback provider: a vLLM of the release and model that the fleet's deploy staged
there, serving under another name with a key of its own, behind an nginx of its own with TLS.

    python3 -c TEXT up    < {"cert", "key", "api_key", "instance", "model", "port", "engine_port"} (JSON)
    python3 -c TEXT down

The certificate, the TLS key and the API key come on stdin, never on a command line.
"""

import json
import os
import re
import shlex
import subprocess
import sys

ETC = "/etc/lab-provider"
UNIT = "lab-provider.service"
NGINX_CONF = "/etc/nginx/conf.d/lab-provider.conf"
FLEET_UNIT = "/etc/systemd/system/vllm@.service"
FLEET_ENV = "/etc/vllm-fleet/instances/{}.env"


def write(path, text, mode=0o600):
    fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(path + ".new", path)


def engine_env(instance, model, engine_port, api_key):
    """The fleet instance's environment, serving ``model`` on loopback at ``engine_port`` with ``api_key``."""
    with open(FLEET_ENV.format(instance)) as f:
        lines = f.read().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    # As systemd reads it: the file's quoted value, then $ENGINE_ARGS split at whitespace.
    args = shlex.split(env["ENGINE_ARGS"])[0].split()
    for flag, value in (("--served-model-name", model), ("--host", "127.0.0.1"), ("--port", str(engine_port))):
        args[args.index(flag) + 1] = value
    env.update(ENGINE_ARGS=shlex.quote(" ".join(args)), VLLM_API_KEY=api_key)
    return "".join(f"{k}={v}\n" for k, v in env.items())


def engine_python(instance):
    """The python of the release the fleet's instance runs (its unit's per-instance link)."""
    with open(FLEET_UNIT) as f:
        links = re.search(r"^ExecStart=(\S+)/%i/bin/python ", f.read(), re.M).group(1)
    return os.path.join(os.path.realpath(os.path.join(links, instance)), "bin", "python")


def unit(instance):
    user = subprocess.run(["systemctl", "show", "-P", "User", f"vllm@{instance}"], capture_output=True, text=True,
                          check=True).stdout.strip() or "root"
    return (f"[Unit]\nDescription=The lab's stand-in fallback provider (vLLM)\n\n[Service]\nUser={user}\n"
            f"EnvironmentFile={ETC}/vllm.env\n"
            "Environment=HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1\n"
            "Environment=HOME=%C/lab-provider VLLM_CACHE_ROOT=%C/lab-provider\nCacheDirectory=lab-provider\n"
            "WorkingDirectory=%C/lab-provider\nPrivateTmp=yes\n"
            f"ExecStart={engine_python(instance)} -m vllm.entrypoints.openai.api_server $ENGINE_ARGS\n"
            "Restart=on-failure\nKillMode=mixed\n")


def nginx_conf(port, engine_port):
    return (f"# The lab's stand-in fallback provider: TLS here, vLLM (with its own key) on loopback.\n"
            f"server {{\n    listen {port} ssl;\n    server_name _;\n"
            f"    ssl_certificate {ETC}/provider.pem;\n    ssl_certificate_key {ETC}/provider.key;\n"
            f"    location / {{\n        proxy_pass http://127.0.0.1:{engine_port};\n"
            "        proxy_http_version 1.1;\n        proxy_set_header Connection \"\";\n"
            "        proxy_buffering off;\n        proxy_read_timeout 300s;\n    }\n}\n")


def sh(command):
    subprocess.run(command, shell=True, check=True, stdout=sys.stderr)


def up(given):
    if subprocess.run(["sh", "-c", "command -v nginx"], capture_output=True).returncode:
        sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx || "
           "{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx; }")
    os.makedirs(ETC, mode=0o700, exist_ok=True)
    write(f"{ETC}/provider.pem", given["cert"], 0o644)
    write(f"{ETC}/provider.key", given["key"])
    write(f"{ETC}/vllm.env", engine_env(given["instance"], given["model"], given["engine_port"], given["api_key"]))
    write(f"/etc/systemd/system/{UNIT}", unit(given["instance"]), 0o644)
    write(NGINX_CONF, nginx_conf(given["port"], given["engine_port"]), 0o644)
    sh("rm -f /etc/nginx/sites-enabled/default && nginx -t -q && systemctl daemon-reload && "
       f"systemctl enable -q nginx && systemctl restart nginx {UNIT}")


def down():
    sh(f"systemctl disable -q --now {UNIT} 2>/dev/null || true; rm -f {NGINX_CONF} /etc/systemd/system/{UNIT}; "
       f"rm -rf {ETC}; systemctl daemon-reload; if command -v nginx >/dev/null; then systemctl disable -q --now nginx; fi")


if __name__ == "__main__":
    up(json.load(sys.stdin)) if sys.argv[1] == "up" else down()
