# The README's two commands:
#   make lab    set up everything from nothing, bring up the local lab, deploy the fleet to it
#               (smoke test included), then show how to call it and stream one chat completion
#   make test   set up everything from nothing and run every test, the lab end-to-end ones included
# Both need root (the lab is systemd-nspawn containers) and are safe to re-run.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FLEET := $(VENV)/bin/vllm-fleet
RELEASE := cpu-vllm-0.32.0
# The release the lab's rolling-update test upgrades to and rolls back from.
NEXT_RELEASE := cpu-vllm-0.32.0-tf5.18
# The NVIDIA release of the same vLLM (locked, never installed here).
NVIDIA_RELEASE := nvidia-vllm-0.32.0
MODEL := .cache/models/tiny-llama
LAB_HOSTS ?= 2
# torch of the lab release, for the GPU probe's all-reduce run on CPU processes (gloo) in tests.
PROBE_VENV := .cache/probe-venv

.PHONY: setup lab test unit lab-down

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(VENV)/.installed

$(MODEL)/config.json: roles/lab/tiny_model.py | setup
	$(FLEET) lab model $(MODEL)

lab: setup $(MODEL)/config.json
	$(FLEET) lab up --hosts $(LAB_HOSTS)
	$(FLEET) release wheelhouse $(RELEASE)
	$(VENV)/bin/pyinfra -y inventories/lab.py deploys/vllm.py
	$(FLEET) howto

# Installed from the release's own wheelhouse, offline and ignoring local pip configuration.
$(PROBE_VENV)/.installed: inventories/releases/$(RELEASE).lock | setup
	$(PYTHON) -m venv --clear $(PROBE_VENV)
	PIP_CONFIG_FILE=/dev/null $(PROBE_VENV)/bin/pip install --quiet --disable-pip-version-check --no-index \
		--find-links "$$($(FLEET) release wheelhouse $(RELEASE) | tail -1)" torch numpy
	touch $@

# nft checks the firewall's rules in the tests, in network namespaces of their own.
NFT := /usr/sbin/nft
$(NFT):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables

# promtool checks and unit-tests the alert rules. Debian's and Ubuntu's prometheus package ships it
# and starts a Prometheus server, which a control node does not need: it is disabled at once
# (where systemd runs; the package is new here, so no Prometheus of the operator's is touched).
PROMTOOL := /usr/bin/promtool
$(PROMTOOL):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
	if [ -d /run/systemd/system ]; then systemctl disable --now prometheus.service; fi

# amtool checks Alertmanager's receiver in the tests, as the deploy does on the monitor host. Debian's
# and Ubuntu's prometheus-alertmanager package ships it and starts an Alertmanager, disabled at once
# likewise.
AMTOOL := /usr/bin/amtool
$(AMTOOL):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		prometheus-alertmanager
	if [ -d /run/systemd/system ]; then systemctl disable --now prometheus-alertmanager.service; fi

# nginx (with its njs module) checks and runs the edge's configuration for each routing policy, and
# the njs CLI runs the prefix policy's key function. nginx's package starts nginx, which a control
# node does not need: stopped and disabled at once where systemd runs (the package is new here).
NGINX := /usr/sbin/nginx
NJS := /usr/bin/njs
$(NGINX):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx \
		libnginx-mod-http-js
	if [ -d /run/systemd/system ]; then systemctl disable --now nginx.service; fi
$(NJS):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends njs

unit: setup $(MODEL)/config.json $(PROBE_VENV)/.installed $(NFT) $(PROMTOOL) $(AMTOOL) $(NGINX) $(NJS)
	GPU_PROBE_PYTHON=$(CURDIR)/$(PROBE_VENV)/bin/python $(PY) -m pytest -q -m "not lab"

test: setup $(MODEL)/config.json $(PROBE_VENV)/.installed $(NFT) $(PROMTOOL) $(AMTOOL) $(NGINX) $(NJS)
	$(VENV)/bin/ruff check --select F,E9 roles tests deploys inventories
	$(VENV)/bin/lint-imports
	GPU_PROBE_PYTHON=$(CURDIR)/$(PROBE_VENV)/bin/python $(PY) -m pytest -q -m "not lab"
	# The NVIDIA release's metric names are derived from the CPU release's capture: derive them again
	# from the two engine wheels the locks pin and fail if the committed file differs.
	$(FLEET) release metrics $(NVIDIA_RELEASE) --like $(RELEASE) --check
	$(FLEET) lab up --hosts $(LAB_HOSTS)
	$(FLEET) release wheelhouse $(RELEASE)
	$(FLEET) release wheelhouse $(NEXT_RELEASE)
	# In this order: the end-to-end tests deploy the fleet that the capacity and rollout tests use.
	$(PY) -m pytest -v -s -m lab tests/lab/test_lab_hosts.py tests/lab/test_lab_e2e.py tests/lab/test_lab_edge.py tests/lab/test_lab_routing.py tests/lab/test_lab_bench.py tests/lab/test_lab_group.py tests/lab/test_lab_monitor.py tests/lab/test_lab_fallback.py tests/lab/test_lab_capacity.py tests/lab/test_lab_artifacts.py tests/lab/test_lab_rollout.py

lab-down: setup
	$(FLEET) lab down
