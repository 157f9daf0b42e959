"""The vLLM role: pinned release venvs side by side, staged models, one systemd unit per instance.

Idempotency comes from facts read at execute time: a venv records the digest of the lock it
was built from, a model directory the digest of its checksum list, so an unchanged release or
model is neither pushed nor reinstalled. Each instance runs the release its own link points
at; new instances start here, changed ones restart in the rolling update (roles/rollout.py).
"""

from __future__ import annotations

import shlex
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import FileUploadCommand, StringCommand, deploy, operation
from pyinfra.facts.files import FileContents, FindFiles, Link
from pyinfra.facts.server import Command, LinuxDistribution
from pyinfra.operations import files, server, systemd

from roles import paths, platform
from roles.facts import CompleteDirs, InstanceModels, InstanceReleases
from roles.plan import engine, fleet
from roles.plan.fleet import HostPlan, Model
from roles.private_files import upload_commands
from roles.release.host import dirs_to_remove, host_install_command
from roles.release.lock import Lock
from roles.release.wheelhouse import build_wheelhouse
from roles.rollout import Member, Rollout, decide


def switch_link(link: str, target: str) -> StringCommand:
    """Point ``link`` at ``target`` in one step (a rename over it): never missing, even for an instant."""
    target_q, new_q, link_q = shlex.quote(target), shlex.quote(f"{link}.new"), shlex.quote(link)
    return StringCommand(f"ln -sfn {target_q} {new_q} && mv -T {new_q} {link_q}")


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
    venv_q, staging_q, tar_q = shlex.quote(venv_dir), shlex.quote(staging), shlex.quote(f"{staging}/wheels.tar")
    yield StringCommand(f"rm -rf {venv_q} {staging_q} && mkdir -p {staging_q}")
    yield FileUploadCommand(str(wheelhouse / "wheels.tar"), f"{staging}/wheels.tar")
    yield StringCommand(f"tar -xf {tar_q} -C {staging_q} && rm {tar_q}")
    yield StringCommand(host_install_command(lock, venv_dir, staging, python=python))
    yield StringCommand(f"rm -rf {staging_q}")


@operation()
def staged_model(model: Model, dest: str, venv_dir: str, user: str, hf_home: str):
    """Put the model's weights at ``dest`` and prove them intact, unless already there."""
    if _recorded_digest(f"{dest}/{paths.DIGEST_FILE}") == model.digest:
        host.noop(f"model {model.served_name} ({model.digest[:12]}) is staged in {dest}")
        return
    dest_q = shlex.quote(dest)
    if model.local_path is not None:
        yield StringCommand(f"rm -rf {dest_q} && mkdir -p {dest_q}")
        for rel, _ in model.files:
            yield FileUploadCommand(str(model.local_path / rel), f"{dest}/{rel}")
        yield FileUploadCommand(StringIO(model.checksum_file()), f"{dest}/SHA256SUMS")
        yield StringCommand(f"cd {dest_q} && sha256sum --check --quiet --strict SHA256SUMS")
    else:
        # Downloaded on the host into the Hugging Face cache the units read offline. The id and
        # revision reach Python as arguments, never as source code.
        fetch = ("import sys; from huggingface_hub import snapshot_download; "
                 "snapshot_download(sys.argv[1], revision=sys.argv[2])")
        home = shlex.quote(hf_home)
        yield StringCommand(f"mkdir -p {home} && chown {shlex.quote(user + ':')} {home} && " + shlex.join([
            "sudo", "-u", user, "env", f"HF_HOME={hf_home}", f"{venv_dir}/bin/python", "-c", fetch,
            model.model_id, model.revision]))
    digest_file = shlex.quote(f"{dest}/{paths.DIGEST_FILE}")
    yield StringCommand(f"chmod -R a+rX {dest_q} && echo {shlex.quote(model.digest)} > {digest_file}")


def placements(plan: HostPlan) -> dict[str, str]:
    """Per instance: the cores its threads bind to (CPU) or its GPUs (NVIDIA)."""
    if plan.accelerator == "nvidia":
        return {name: ",".join(map(str, gpus)) for name, gpus in fleet.auto_gpus(plan.instances).items()}
    cores = fleet.split_cores(int(host.get_fact(Command, command="nproc")), len(plan.instances))
    return {inst.name: inst.get("vllm_cpu_cores") or auto for inst, auto in zip(plan.instances, cores)}


@deploy("Release")
def release(plan: HostPlan):
    """Host packages, the service user and the release venv. Returns the venv operation."""
    user, install_dir, data_dir = plan.get("vllm_user"), plan.get("vllm_install_dir"), plan.get("vllm_data_dir")
    plat = platform.for_host(plan.name, host.get_fact(LinuxDistribution), plan.lock.python, plan.get("vllm_python"))

    platform.install_packages("Install host packages", plat.packages + ["sudo"], no_recommends=True)
    server.user(name=f"Create system user {user}", user=user, system=True, home=data_dir,
                shell="/usr/sbin/nologin", create_home=False)
    for path in (install_dir, f"{install_dir}/venvs", f"{install_dir}/instances", data_dir, f"{data_dir}/models"):
        files.directory(name=f"Directory {path}", path=path, mode="755")
    # Environment files may hold API keys; systemd reads them as root.
    files.directory(name=f"Directory {paths.ENV_DIR}", path=paths.ENV_DIR, mode="700")

    venv = release_venv(name=f"Release {plan.release.name} venv (first install: several minutes)",
                        lock=plan.lock, venv_dir=plan.venv_dir, python=plat.python)
    links_dir = f"{install_dir}/instances"
    prune(name=f"Keep the newest {plan.get('vllm_keep_releases')} release venvs", parent=f"{install_dir}/venvs",
          marker=".lock-digest", keep=plan.get("vllm_keep_releases"), protected=lambda: {
              plan.venv_dir, *(link["venv"] for link in host.get_fact(InstanceReleases, links_dir=links_dir).values()),
              *filter(None, [(host.get_fact(Link, path=f"{install_dir}/current") or {}).get("link_target")])})
    return venv


@operation()
def release_link(path: str, target: str, still_elsewhere):
    """Switch the host's release link once every instance runs the release (``still_elsewhere()``
    lists those that do not)."""
    waiting_for = still_elsewhere()
    if waiting_for:
        host.log_styled(f"{path} stays where it is: {', '.join(waiting_for)} not on {target} yet", fg="yellow")
        return
    if (host.get_fact(Link, path=path) or {}).get("link_target") == target:
        host.noop(f"{path} already points at {target}")
        return
    yield switch_link(path, target)


@operation()
def prune(parent: str, marker: str, keep: int, protected):
    """Remove the folders under ``parent`` (release venvs, staged models) beyond the newest
    ``keep``; never one of ``protected()``, read at execute time: the one being rolled to, the
    ones instances use, the host's current one."""
    for folder in dirs_to_remove(host.get_fact(CompleteDirs, parent=parent, marker=marker), keep, protected()):
        yield StringCommand(f"rm -rf {shlex.quote(folder)}")


@operation()
def first_start(rollout: Rollout, member: Member, env_text: str, link: str, target: str, target_release: str,
                address: str, timeout: int):
    """Start an instance the host does not have yet (no environment file): it is not in nginx's
    upstream yet, so it needs no draining. Existing instances restart in the rolling update."""
    env_path = f"{paths.ENV_DIR}/{member.name}.env"
    if host.get_fact(FileContents, path=env_path) is not None:
        host.noop(f"vllm@{member.name} exists; restarts go through the rolling update")
        return
    if host.name in rollout.refusals:
        host.noop(f"vllm@{member.name} is not started: its flags were refused")
        return
    yield from upload_commands(env_text, env_path)
    yield switch_link(link, target)
    yield StringCommand(shlex.join(["systemctl", "enable", "--now", f"vllm@{member.name}"]))
    yield StringCommand(shlex.join(["python3", paths.FLEET_PROBE_PATH, "wait", "--unit", f"vllm@{member.name}",
                                    "--address", address, "--port", str(member.port), "--timeout", str(timeout)]))
    rollout.runs(member, target, target_release)


@deploy("vLLM host")
def vllm_host(plan: HostPlan, rollout: Rollout, api_key: str) -> dict[str, str]:
    """The model, the units, the restart decisions and the instances that are new, up to each
    answering /health. ``api_key``: the fleet's internal key, which every instance requires.
    Returns each instance's environment file, for the rolling update."""
    user, install_dir, data_dir = plan.get("vllm_user"), plan.get("vllm_install_dir"), plan.get("vllm_data_dir")
    model = staged_model(name=f"Model {plan.model.served_name}", model=plan.model, dest=plan.model_dir,
                         venv_dir=plan.venv_dir, user=user, hf_home=f"{data_dir}/hf")
    # Pushed models are kept like releases; hub snapshots share blobs in the Hugging Face cache,
    # which its own tools prune.
    prune(name=f"Keep the newest {plan.get('vllm_keep_releases')} staged models", parent=f"{data_dir}/models",
          marker=paths.DIGEST_FILE, keep=plan.get("vllm_keep_releases"),
          protected=lambda: {plan.model_dir, *host.get_fact(InstanceModels, env_dir=paths.ENV_DIR)})
    for src, dest in ((paths.FLEET_PROBE, paths.FLEET_PROBE_PATH), (paths.CHECK_ENGINE_ARGS, paths.CHECK_ENGINE_ARGS_PATH)):
        files.put(name=f"Install {src.name}", src=str(src), dest=dest, mode="755", create_remote_dir=True)
    unit = files.template(name="Render the vllm@.service template unit",
                          src=str(paths.TEMPLATES / "vllm@.service.j2"), dest=paths.UNIT_FILE,
                          service_user=user, env_dir=paths.ENV_DIR, links_dir=f"{install_dir}/instances",
                          data_dir=data_dir, stop_timeout=plan.get("vllm_stop_timeout"),
                          accelerator=plan.accelerator)
    systemd.daemon_reload(name="Reload systemd units", _if=unit.did_change)

    where = placements(plan)
    env_texts = {i.name: engine.env_file(engine.render_env(plan, i, where[i.name], api_key)) for i in plan.instances}
    decide(name="Decide which instances restart (flags checked by the new release)", rollout=rollout,
           env_texts=env_texts, engine_args={i.name: engine.render_args(plan, i) for i in plan.instances},
           env_dir=paths.ENV_DIR, links_dir=f"{install_dir}/instances", target=plan.venv_dir,
           target_release=plan.release.name, check_script=paths.CHECK_ENGINE_ARGS_PATH,
           host_changes=lambda: "unit file changed" if unit.did_change() else
           "model changed" if model.did_change() else None)
    # One after another: instances loading at the same moment race for memory.
    for member in rollout.members_on(plan.name):
        first_start(name=f"Start vllm@{member.name} if new (waits for /health, up to {plan.get('vllm_start_timeout')}s)",
                    rollout=rollout, member=member, env_text=env_texts[member.name],
                    link=f"{install_dir}/instances/{member.name}", target=plan.venv_dir,
                    target_release=plan.release.name, address=plan.listen_address,
                    timeout=plan.get("vllm_start_timeout"))
        systemd.service(name=f"Enable vllm@{member.name} at boot", service=f"vllm@{member.name}", running=None,
                        enabled=True)
    return env_texts


def settle_release_link(plan: HostPlan, rollout: Rollout) -> None:
    """Point the host's ``current`` link at its release once all its instances run it."""
    mine = rollout.members_on(plan.name)
    release_link(name="Point the host's current release link at it",
                 path=f"{plan.get('vllm_install_dir')}/current", target=plan.venv_dir,
                 still_elsewhere=lambda: [f"vllm@{m.name}" for m in mine if rollout.running.get(m) != plan.venv_dir])


@deploy("Retire removed vLLM instances")
def retire_removed_instances(plan: HostPlan) -> None:
    """Stop, disable and forget instances the inventory no longer lists (they would hold memory
    and cores while the load balancer no longer sends them anything). Runs after the load
    balancer has been reconfigured without them, so no request is sent to a stopping instance."""
    kept = {inst.name for inst in plan.instances}
    env_files = host.get_fact(FindFiles, path=paths.ENV_DIR, fname="*.env", maxdepth=1) or []
    for name in sorted(Path(f).stem for f in env_files if Path(f).stem not in kept):
        systemd.service(name=f"Stop vllm@{name} (no longer in the inventory)", service=f"vllm@{name}",
                        running=False, enabled=False)
        files.file(name=f"Remove the environment of vllm@{name}", path=f"{paths.ENV_DIR}/{name}.env", present=False)
