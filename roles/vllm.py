"""The vLLM role: a pinned release venv, the staged model, and one systemd unit per instance.

Idempotency comes from facts read at execute time: the venv records the digest of the lock
it was built from, the model directory the digest of its checksum list, so an unchanged
release or model is neither pushed nor reinstalled, and no instance is restarted.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import FileUploadCommand, StringCommand, deploy, operation
from pyinfra.facts.files import FileContents, FindFiles, Link
from pyinfra.facts.server import Command, LinuxDistribution
from pyinfra.operations import apt, files, server, systemd
from pyinfra.operations.util import any_changed

from roles import engine, fleet, platform
from roles.fleet import HostPlan, Model
from roles.facts import InstalledReleases
from roles.release import Lock, build_wheelhouse, host_install_command, releases_to_remove

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
PROBE = Path(__file__).resolve().parent / "files" / "fleet_probe.py"
# Where the role keeps host-side files other than venvs and data.
ENV_DIR = "/etc/vllm-fleet/instances"
PROBE_PATH = "/usr/local/lib/vllm-fleet/fleet_probe.py"
DIGEST_FILE = ".vllm-fleet-digest"


def _recorded_digest(path: str) -> str | None:
    lines = host.get_fact(FileContents, path=path)
    return lines[0].strip() if lines else None


@operation()
def release_venv(lock: Lock, venv_dir: str, python: str):
    """Build the release venv from the control node's wheelhouse, unless this lock is installed.

    The wheels (and the lock) travel as one tar and are installed with ``--no-index --require-hashes``: hosts
    never reach a package index, and a wheel that differs from the lock fails the install.
    """
    if _recorded_digest(f"{venv_dir}/.lock-digest") == lock.digest:
        host.noop(f"release {lock.release} is installed in {venv_dir}")
        return
    wheelhouse = build_wheelhouse(lock)
    staging = f"{venv_dir}.wheels"
    yield StringCommand(f"rm -rf {venv_dir} {staging} && mkdir -p {staging}")
    yield FileUploadCommand(str(wheelhouse / "wheels.tar"), f"{staging}/wheels.tar")
    yield StringCommand(f"tar -xf {staging}/wheels.tar -C {staging} && rm {staging}/wheels.tar")
    yield StringCommand(host_install_command(lock, venv_dir, staging, python=python))
    yield StringCommand(f"rm -rf {staging}")


@operation()
def staged_model(model: Model, dest: str, venv_dir: str, user: str, hf_home: str):
    """Put the model's weights at ``dest`` and prove them intact, unless already there."""
    if _recorded_digest(f"{dest}/{DIGEST_FILE}") == model.digest:
        host.noop(f"model {model.served_name} ({model.digest[:12]}) is staged in {dest}")
        return
    if model.local_path is not None:
        yield StringCommand(f"rm -rf {dest} && mkdir -p {dest}")
        for rel, _ in model.files:
            yield FileUploadCommand(str(model.local_path / rel), f"{dest}/{rel}")
        yield FileUploadCommand(StringIO(model.checksum_file()), f"{dest}/SHA256SUMS")
        yield StringCommand(f"cd {dest} && sha256sum --check --quiet --strict SHA256SUMS")
    else:
        # Downloaded on the host into the Hugging Face cache the units read offline.
        fetch = (f"from huggingface_hub import snapshot_download; "
                 f"snapshot_download({model.model_id!r}, revision={model.revision!r})")
        yield StringCommand(f"mkdir -p {hf_home} && chown {user}: {hf_home} && "
                            f"sudo -u {user} env HF_HOME={hf_home} {venv_dir}/bin/python -c \"{fetch}\"")
    yield StringCommand(f"chmod -R a+rX {dest} && echo {model.digest} > {dest}/{DIGEST_FILE}")


def placements(plan: HostPlan) -> dict[str, str]:
    """Per instance: the cores its threads bind to (CPU) or its GPUs (NVIDIA)."""
    if plan.accelerator == "nvidia":
        return {name: ",".join(map(str, gpus)) for name, gpus in fleet.auto_gpus(plan.instances).items()}
    cores = fleet.split_cores(int(host.get_fact(Command, command="nproc")), len(plan.instances))
    return {inst.name: inst.get("vllm_cpu_cores") or auto for inst, auto in zip(plan.instances, cores)}


@deploy("Release")
def release(plan: HostPlan):
    """Host packages, the service user and the release venv behind the `current` link. Returns the
    venv and link operations: a change in either restarts the instances."""
    user, install_dir, data_dir = plan.get("vllm_user"), plan.get("vllm_install_dir"), plan.get("vllm_data_dir")
    plat = platform.for_host(plan.name, host.get_fact(LinuxDistribution), plan.lock.python, plan.get("vllm_python"))

    apt.packages(name="Install host packages", packages=plat.packages + ["sudo"], update=True,
                 cache_time=3600, no_recommends=True, extra_install_args=platform.APT_INSTALL_ARGS)
    server.user(name=f"Create system user {user}", user=user, system=True, home=data_dir,
                shell="/usr/sbin/nologin", create_home=False)
    for path in (install_dir, f"{install_dir}/venvs", data_dir, f"{data_dir}/models", ENV_DIR):
        files.directory(name=f"Directory {path}", path=path, mode="755")

    venv = release_venv(name=f"Release {plan.release.name} venv (first install: several minutes)",
                        lock=plan.lock, venv_dir=plan.venv_dir, python=plat.python)
    link = f"{install_dir}/current"
    previous = (host.get_fact(Link, path=link) or {}).get("link_target")
    current = release_link(name="Point the current release link at it", path=link, target=plan.venv_dir)
    old_releases(name=f"Keep the newest {plan.get('vllm_keep_releases')} releases", venvs_dir=f"{install_dir}/venvs",
                 keep=plan.get("vllm_keep_releases"), protected={plan.venv_dir, *([previous] if previous else [])})
    return venv, current


@operation()
def release_link(path: str, target: str):
    """Switch the release link in one step (rename over it): a reader sees the old or the new
    release, never a missing link."""
    if (host.get_fact(Link, path=path) or {}).get("link_target") == target:
        host.noop(f"{path} already points at {target}")
        return
    yield StringCommand(f"ln -sfn {target} {path}.new && mv -T {path}.new {path}")


@operation()
def old_releases(venvs_dir: str, keep: int, protected: set[str]):
    """Remove release venvs beyond the newest ``keep``. ``protected`` holds the release switched to
    and the one the instances ran before this deploy (they use it until they restart)."""
    for venv in releases_to_remove(host.get_fact(InstalledReleases, venvs_dir=venvs_dir), keep, protected):
        yield StringCommand(f"rm -rf {venv}")


@deploy("vLLM host")
def vllm_host(plan: HostPlan, installed):
    """The model, the units and the instances, up to each answering /health. ``installed`` is what
    ``release`` returned."""
    venv, current = installed
    user, install_dir, data_dir = plan.get("vllm_user"), plan.get("vllm_install_dir"), plan.get("vllm_data_dir")
    model = staged_model(name=f"Model {plan.model.served_name}", model=plan.model, dest=plan.model_dir,
                         venv_dir=plan.venv_dir, user=user, hf_home=f"{data_dir}/hf")
    files.put(name="Install the health/smoke probe", src=str(PROBE), dest=PROBE_PATH, mode="755",
              create_remote_dir=True)
    unit = files.template(name="Render the vllm@.service template unit",
                          src=str(TEMPLATES / "vllm@.service.j2"), dest="/etc/systemd/system/vllm@.service",
                          service_user=user, env_dir=ENV_DIR, install_dir=install_dir, data_dir=data_dir)
    systemd.daemon_reload(name="Reload systemd units", _if=unit.did_change)

    where = placements(plan)
    # One after another: instances loading at the same moment race for memory.
    for inst in plan.instances:
        unit_name = f"vllm@{inst.name}"
        env = files.put(name=f"Environment of {unit_name}",
                        src=StringIO(engine.env_file(engine.render_env(plan, inst, where[inst.name]))),
                        dest=f"{ENV_DIR}/{inst.name}.env", mode="600")
        started = systemd.service(name=f"Start {unit_name}", service=unit_name, running=True, enabled=True)
        config_changed = any_changed(env, unit, venv, current, model)
        restarted = systemd.service(name=f"Restart {unit_name} on its new configuration", service=unit_name,
                                    restarted=True,
                                    _if=lambda c=config_changed, s=started: c() and not s.did_change())
        server.shell(name=f"Wait for {unit_name} /health (up to {plan.get('vllm_start_timeout')}s)",
                     commands=[f"python3 {PROBE_PATH} wait --unit {unit_name} --port {inst.port} "
                               f"--timeout {plan.get('vllm_start_timeout')}"],
                     _if=any_changed(started, restarted))


@deploy("Retire removed vLLM instances")
def retire_removed_instances(plan: HostPlan) -> None:
    """Stop, disable and forget instances the inventory no longer lists (they would hold memory
    and cores while the load balancer no longer sends them anything). Runs after the load
    balancer has been reconfigured without them, so no request is sent to a stopping instance."""
    kept = {inst.name for inst in plan.instances}
    env_files = host.get_fact(FindFiles, path=ENV_DIR, fname="*.env", maxdepth=1) or []
    for name in sorted(Path(f).stem for f in env_files if Path(f).stem not in kept):
        systemd.service(name=f"Stop vllm@{name} (no longer in the inventory)", service=f"vllm@{name}",
                        running=False, enabled=False)
        files.file(name=f"Remove the environment of vllm@{name}", path=f"{ENV_DIR}/{name}.env", present=False)
