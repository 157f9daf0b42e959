"""A local test lab: N Debian hosts booted with systemd-nspawn on this machine.

Each host is an overlay on one shared debootstrap rootfs, has its own network namespace on a
bridge, runs real systemd and sshd, and reaches Debian packages only through an apt-cacher-ng
on the bridge (the bridge has no route out). Deploys talk to the hosts over ssh, exactly as
they would to real servers.

    vllm-fleet lab up [--hosts N]      # build/boot; idempotent; writes <state>/lab.json
    vllm-fleet lab down [--keep-base]  # stop and remove everything (optionally keep base + key)
    vllm-fleet lab status              # table of hosts
    vllm-fleet lab model DEST          # the tiny random-weight Llama the lab serves
    vllm-fleet lab deploy-cost         # what an install-only deploy costs at N = 1, 2, 4, 8 hosts

Only tests and the CLI import this package (an import-linter contract keeps it so): it needs
root and the [lab] extra.

This machine's PID 1 is not systemd, which shapes several choices below (nspawn flags,
starting apt-cacher-ng by hand).
"""
