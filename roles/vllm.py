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

from pyinfra import host, state
from pyinfra.api import FileUploadCommand, FunctionCommand, StringCommand, deploy, operation
from pyinfra.facts.files import FileContents, FindFiles, Link
from pyinfra.facts.server import Command, LinuxDistribution
from pyinfra.operations import files, server, systemd

from roles import gates, group, paths, platform
from roles.artifact_sources import ModelSource, model_source
from roles.cache import artifacts_script, fetch_command, hub_download_commands
from roles.common import manifest_json
from roles.facts import CompleteDirs, InstanceModels, InstanceReleases
from roles.plan import engine, fleet
from roles.plan.artifacts import CachePlan
from roles.plan.fleet import FleetPlan, HostPlan
from roles.plan.groups import group_stage
from roles.private_files import upload_commands
from roles.release.host import dirs_to_remove, host_install_command
from roles.release.lock import Lock
from roles.release.wheelhouse import wheel_files
from roles.rollout import Member, Rollout, decide, run_logged


def switch_link(link: str, target: str) -> StringCommand:
    """Point ``link`` at ``target`` in one step (a rename over it): never missing, even for an instant."""
    target_q, new_q, link_q = shlex.quote(target), shlex.quote(f"{link}.new"), shlex.quote(link)
    return StringCommand(f"ln -sfn {target_q} {new_q} && mv -T {new_q} {link_q}")


def _recorded_digest(path: str) -> str | None:
    lines = host.get_fact(FileContents, path=path)
    return lines[0].strip() if lines else None


@operation()
def release_venv(lock: Lock, venv_dir: str, python: str, wheel_store: str, cache: CachePlan | None,
                 index_url: str | None):
    """Build the release venv, unless this lock is installed: from the operator's index
    (``index_url``) or from the host's wheel store, which first pulls from the artifact cache the
    wheels it lacks. Either way every wheel is checked against the lock's hash (``--require-hashes``)."""
    if _recorded_digest(f"{venv_dir}/.lock-digest") == lock.digest:
        host.noop(f"release {lock.release} is installed in {venv_dir}")
        return
    lock_file = f"{venv_dir}.lock"
    yield FileUploadCommand(str(lock.path), lock_file)
    if index_url is not None:
        yield StringCommand(host_install_command(lock, venv_dir, lock_file, ["--index-url", index_url], python))
    else:
        manifest = f"{venv_dir}.wheels.json"
        yield FileUploadCommand(StringIO(manifest_json(wheel_files(lock))), manifest)
        yield StringCommand(f"mkdir -p {shlex.quote(wheel_store)}")
        yield StringCommand(fetch_command(cache.wheels_url, manifest, wheel_store))
        yield StringCommand(host_install_command(lock, venv_dir, lock_file, ["--no-index", "--find-links", wheel_store],
                                                 python, wheel_manifest=manifest))
        yield StringCommand(f"rm -f {shlex.quote(manifest)}")
    yield StringCommand(f"rm -f {shlex.quote(lock_file)}")


@operation()
def unused_wheels_removed(wheel_store: str, venvs_dir: str):
    """Remove the wheels of the host's store that no kept release venv was built from (run after
    the venvs are pruned): the store keeps exactly what a rollback or the next upgrade reuses."""
    if not state.is_executing:
        return  # the listing script is installed by this deploy: asked only once it runs
    venvs = host.get_fact(CompleteDirs, parent=venvs_dir, marker=paths.WHEEL_MANIFEST)
    argv = ["python3", paths.ARTIFACTS_PATH, "unlisted", "--dir", wheel_store]
    for venv in venvs:
        argv += ["--manifest", f"{venv}/{paths.WHEEL_MANIFEST}"]
    unused = (host.get_fact(Command, command=shlex.join(argv)) or "").split()
    if not unused:
        host.noop(f"every wheel in {wheel_store} belongs to a kept release")
        return
    yield StringCommand(shlex.join(["rm", "-f", *(f"{wheel_store}/{name}" for name in unused)]))


@operation()
def staged_model(source: ModelSource, dest: str, cache: CachePlan | None):
    """Put the model's weights at ``dest``, every file checked against its manifest, unless already
    there: pulled from the artifact cache, or (``vllm_hub_download = hosts``) from the Hub itself.
    They arrive in ``DEST.partial``, which takes the name once whole (a failed pull keeps what it
    checked, and the next deploy resumes)."""
    model = source.model
    if _recorded_digest(f"{dest}/{paths.DIGEST_FILE}") == model.digest:
        host.noop(f"model {model.served_name} ({model.digest[:12]}) is staged in {dest}")
        return
    partial, manifest = f"{dest}.partial", f"{dest}.partial.json"
    yield StringCommand(shlex.join(["mkdir", "-p", partial]))
    yield FileUploadCommand(StringIO(manifest_json(source.files)), manifest)
    if source.how == "hosts":
        yield from hub_download_commands(source, manifest, partial)
    else:
        yield StringCommand(fetch_command(cache.model_url(model.dirname), manifest, partial))
    yield StringCommand(" && ".join([
        shlex.join(["mv", manifest, f"{partial}/{paths.MODEL_MANIFEST}"]), shlex.join(["rm", "-rf", dest]),
        shlex.join(["mv", "-T", partial, dest]), shlex.join(["chmod", "-R", "a+rX", dest]),
        f"echo {shlex.quote(model.digest)} > {shlex.quote(f'{dest}/{paths.DIGEST_FILE}')}"]))


def placements(plan: HostPlan) -> dict[str, str]:
    """Per instance: the cores its threads bind to (CPU) or its GPUs (NVIDIA)."""
    if plan.accelerator == "nvidia":
        return {name: ",".join(map(str, gpus)) for name, gpus in fleet.auto_gpus(plan.instances).items()}
    cores = fleet.split_cores(int(host.get_fact(Command, command="nproc")), len(plan.instances))
    return {inst.name: inst.get("vllm_cpu_cores") or auto for inst, auto in zip(plan.instances, cores)}


@deploy("Release")
def release(plan: HostPlan, cache: CachePlan | None):
    """Host packages, the service user and the release venv, its wheels pulled from ``cache`` (the
    fleet's artifact cache) unless the release names the operator's index."""
    user, install_dir, data_dir = plan.get("vllm_user"), plan.get("vllm_install_dir"), plan.get("vllm_data_dir")
    plat = platform.for_host(plan.name, host.get_fact(LinuxDistribution), plan.lock.python, plan.get("vllm_python"))

    platform.install_packages("Install host packages", plat.packages + ["sudo"], no_recommends=True)
    server.user(name=f"Create system user {user}", user=user, system=True, home=data_dir,
                shell="/usr/sbin/nologin", create_home=False)
    for path in (install_dir, f"{install_dir}/venvs", f"{install_dir}/instances", data_dir, f"{data_dir}/models"):
        files.directory(name=f"Directory {path}", path=path, mode="755")
    # Environment files may hold API keys; systemd reads them as root.
    files.directory(name=f"Directory {paths.ENV_DIR}", path=paths.ENV_DIR, mode="700")
    artifacts_script()

    wheel_store, venvs_dir = f"{install_dir}/wheels", f"{install_dir}/venvs"
    release_venv(name=f"Release {plan.release.name} venv (first install: several minutes)",
                 lock=plan.lock, venv_dir=plan.venv_dir, python=plat.python, wheel_store=wheel_store,
                 cache=cache, index_url=plan.release.index.host_index_url)
    links_dir = f"{install_dir}/instances"
    prune(name=f"Keep the newest {plan.get('vllm_keep_releases')} release venvs", parent=venvs_dir,
          marker=".lock-digest", keep=plan.get("vllm_keep_releases"), protected=lambda: {
              plan.venv_dir, *(link["venv"] for link in host.get_fact(InstanceReleases, links_dir=links_dir).values()),
              *filter(None, [(host.get_fact(Link, path=f"{install_dir}/current") or {}).get("link_target")])})
    unused_wheels_removed(name="Keep the wheels the kept release venvs were built from", wheel_store=wheel_store,
                          venvs_dir=venvs_dir)


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
    upstream yet, so it needs no draining. Existing instances restart in the rolling update. A
    follower stage of a multi-host instance is started without waiting: it has no /health, and
    its leader, started next, waits for it."""
    env_path = f"{paths.ENV_DIR}/{member.name}.env"
    if host.get_fact(FileContents, path=env_path) is not None:
        host.noop(f"vllm@{member.name} exists; restarts go through the rolling update")
        return
    if host.name in rollout.refusals:
        host.noop(f"vllm@{member.name} is not started: its flags were refused")
        return
    if member.group and (lost := rollout.failed_stages(member.group)):
        # A leader would wait for the missing stage until vllm_start_timeout, then fail with nothing said.
        yield gates.failure(f"vllm@{member.name} is not started: its instance group {member.group} lost "
                            f"{', '.join(lost)} in this run (see there why), and cannot form without it")
        return
    yield from upload_commands(env_text, env_path)
    yield switch_link(link, target)
    yield StringCommand(shlex.join(["systemctl", "enable", "--now", f"vllm@{member.name}"]))
    if member.serves:
        # Logged: how long the start took is worth seeing (a leader's includes its followers' joining).
        yield FunctionCommand(run_logged, (shlex.join([
            "python3", paths.FLEET_PROBE_PATH, "wait", "--unit", f"vllm@{member.name}", "--address", address,
            "--port", str(member.port), "--timeout", str(timeout)]),), {})
    rollout.runs(member, target, target_release)


@deploy("Model")
def host_model(fleet: FleetPlan, plan: HostPlan):
    """The host's model staged (see ``staged_model``), and the staged models beyond the newest
    vllm_keep_releases removed (never one an instance runs). Returns the staging operation."""
    staged = staged_model(name=f"Model {plan.model.served_name} ({plan.model.dirname})",
                          source=model_source(fleet, plan), dest=plan.model_dir, cache=fleet.cache)
    prune(name=f"Keep the newest {plan.get('vllm_keep_releases')} staged models",
          parent=f"{plan.get('vllm_data_dir')}/models", marker=paths.DIGEST_FILE, keep=plan.get("vllm_keep_releases"),
          protected=lambda: {plan.model_dir, *host.get_fact(InstanceModels, env_dir=paths.ENV_DIR)})
    return staged


@deploy("vLLM host")
def vllm_host(plan: HostPlan, rollout: Rollout, api_key: str, model_op) -> dict[str, str]:
    """The units, the restart decisions and the instances that are new, up to each answering
    /health. ``api_key``: the fleet's internal key, which every instance requires; ``model_op``:
    the model's staging (``host_model``), whose change restarts the instances. Returns each
    instance's environment file, for the rolling update."""
    user, install_dir, data_dir = plan.get("vllm_user"), plan.get("vllm_install_dir"), plan.get("vllm_data_dir")
    for src, dest in ((paths.FLEET_PROBE, paths.FLEET_PROBE_PATH), (paths.CHECK_ENGINE_ARGS, paths.CHECK_ENGINE_ARGS_PATH)):
        files.put(name=f"Install {src.name}", src=str(src), dest=dest, mode="755", create_remote_dir=True)
    unit = files.template(name="Render the vllm@.service template unit",
                          src=str(paths.TEMPLATES / "vllm@.service.j2"), dest=paths.UNIT_FILE,
                          service_user=user, env_dir=paths.ENV_DIR, links_dir=f"{install_dir}/instances",
                          data_dir=data_dir, stop_timeout=plan.get("vllm_stop_timeout"),
                          accelerator=plan.accelerator,
                          serve_script=paths.VLLM_SERVE_PATH if group_stage(plan) else None)
    systemd.daemon_reload(name="Reload systemd units", _if=unit.did_change)

    where, interface = placements(plan), group.interface_of(plan)
    env_texts = {i.name: engine.env_file(engine.render_env(plan, i, where[i.name], api_key, interface))
                 for i in plan.instances}
    decide(name="Decide which instances restart (flags checked by the new release)", rollout=rollout,
           env_texts=env_texts, engine_args={i.name: engine.render_args(plan, i) for i in plan.instances},
           env_dir=paths.ENV_DIR, links_dir=f"{install_dir}/instances", target=plan.venv_dir,
           target_release=plan.release.name, check_script=paths.CHECK_ENGINE_ARGS_PATH,
           host_changes=lambda: "unit file changed" if unit.did_change() else
           "model changed" if model_op.did_change() else None)
    group.group_host(plan, rollout)
    mine = rollout.members_on(plan.name)
    # A multi-host instance's followers first (no wait): its leader waits for them at its start.
    for member in [m for m in mine if not m.serves]:
        first_start(name=f"Start vllm@{member.name} if new (a follower stage: its leader waits for it)",
                    rollout=rollout, member=member, env_text=env_texts[member.name],
                    link=f"{install_dir}/instances/{member.name}", target=plan.venv_dir,
                    target_release=plan.release.name, address=plan.listen_address, timeout=0)
    # One after another: instances loading at the same moment race for memory.
    for member in [m for m in mine if m.serves]:
        first_start(name=f"Start vllm@{member.name} if new (waits for /health, up to {plan.get('vllm_start_timeout')}s)",
                    rollout=rollout, member=member, env_text=env_texts[member.name],
                    link=f"{install_dir}/instances/{member.name}", target=plan.venv_dir,
                    target_release=plan.release.name, address=plan.listen_address,
                    timeout=plan.get("vllm_start_timeout"))
    for member in mine:
        systemd.service(name=f"Enable vllm@{member.name} at boot", service=f"vllm@{member.name}", running=None,
                        enabled=True)
    if group_stage(plan):
        group.watchdog(plan)
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
    if group_stage(plan) is None:
        # First: a follower's watchdog would start its stage again when the leader stops.
        group.retire_watchdog()
    env_files = host.get_fact(FindFiles, path=paths.ENV_DIR, fname="*.env", maxdepth=1) or []
    for name in sorted(Path(f).stem for f in env_files if Path(f).stem not in kept):
        systemd.service(name=f"Stop vllm@{name} (no longer in the inventory)", service=f"vllm@{name}",
                        running=False, enabled=False)
        # A stage stopped while it waited for its group, deaf to SIGTERM in a collective call, is
        # killed at TimeoutStopSec and left "failed": gone from the inventory, it is no failure.
        server.shell(name=f"Forget how vllm@{name} ended", commands=[f"systemctl reset-failed vllm@{name} || true"])
        files.file(name=f"Remove the environment of vllm@{name}", path=f"{paths.ENV_DIR}/{name}.env", present=False)
