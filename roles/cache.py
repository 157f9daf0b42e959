"""The artifact cache role, on the cache host (``roles.plan.artifacts``): nginx serving ``cache_dir``
to the fleet's hosts alone, and what the control node sends it, once each: the wheels of every
release the hosts install that it lacks (shared across releases, so an upgrade sends only what the
new lock adds), and the model, pushed, or downloaded here from the Hub with the token.

Pushed files land in ``incoming/`` (not served), are checked against their sha256 there and only
then join what nginx serves; what is already there with the right size is not sent again. The
hosts check every byte again when they pull: a file damaged on the cache fails their install,
naming it. A host that stops being the cache stops serving (its nginx server is removed).
"""

from __future__ import annotations

import shlex
from io import StringIO
from pathlib import Path

import jinja2
from pyinfra import host, state
from pyinfra.api import FileUploadCommand, StringCommand, deploy, operation
from pyinfra.facts.files import File
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from roles import paths, platform
from roles.artifact_sources import ModelSource, download_on_control_node, model_source
from roles.common import ArtifactFile, endpoint, manifest_json
from roles.facts import FileSizes
from roles.plan.artifacts import MODELS, WHEELS, CachePlan
from roles.plan.fleet import FleetPlan
from roles.private_files import upload_commands
from roles.release.lock import Lock
from roles.release.wheelhouse import build_wheelhouse, wheel_files

_TEMPLATE = jinja2.Environment(loader=jinja2.FileSystemLoader(paths.TEMPLATES), keep_trailing_newline=True,
                               trim_blocks=True, undefined=jinja2.StrictUndefined).get_template(
    "nginx-vllm-fleet-cache.conf.j2")


def render_conf(cache: CachePlan) -> str:
    return _TEMPLATE.render(listen=endpoint(cache.address, cache.port), root=cache.root, allow_from=cache.allow_from)


def artifacts_script():
    """roles/files/artifacts.py on this host: every host that fetches, checks or prunes artifacts runs it."""
    return files.put(name=f"Install {paths.ARTIFACTS.name}", src=str(paths.ARTIFACTS), dest=paths.ARTIFACTS_PATH,
                     mode="755", create_remote_dir=True)


def fetch_command(base_url: str, manifest: str, dest: str, token_file: str | None = None) -> str:
    """The host-side fetch of what ``manifest`` lists from ``base_url`` into ``dest``, every byte checked."""
    argv = ["python3", paths.ARTIFACTS_PATH, "fetch", "--base-url", base_url, "--manifest", manifest, "--dest", dest]
    return shlex.join(argv + (["--token-file", token_file] if token_file else []))


def hub_download_commands(source: ModelSource, manifest: str, dest: str):
    """The download of a hub model from the Hub into ``dest`` on this host. The token, if any, is
    written root-only to tmpfs for this one download, which removes it before it connects (and the
    shell after it, should the download not have started)."""
    if source.token is None:
        yield StringCommand(fetch_command(source.url, manifest, dest))
        return
    yield StringCommand(f"install -d -m 700 {paths.HUB_TOKEN_DIR}")
    yield from upload_commands(source.token.reveal() + "\n", paths.HUB_TOKEN_PATH)
    yield StringCommand(fetch_command(source.url, manifest, dest, paths.HUB_TOKEN_PATH)
                        + f"; status=$?; rm -f {paths.HUB_TOKEN_PATH}; exit $status")


def cached_locks(plan: FleetPlan) -> list[Lock]:
    """The locks whose wheels the hosts pull from the cache (not those installed from the operator's index)."""
    return list({h.lock.digest: h.lock for h in plan.hosts if h.release.index.host_index_url is None}.values())


def cached_models(plan: FleetPlan) -> list[ModelSource]:
    """The models the hosts pull from the cache (not those every host downloads from the Hub itself)."""
    sources = {source.model: source for source in (model_source(plan, h) for h in plan.hosts)}
    return [source for source in sources.values() if source.how != "hosts"]


@deploy("Artifact cache")
def artifact_cache(plan: FleetPlan, with_models: bool = True):
    """The cache's nginx server, then what the hosts will pull: every release's wheels and (unless
    ``with_models`` is False: GPU onboarding stages no model) the model."""
    cache = plan.cache
    platform.install_packages("Install nginx", ["nginx"])
    default_site = files.link(name="Remove the packaged default site", path=paths.NGINX_DEFAULT_SITE, present=False)
    for folder in (cache.root, f"{cache.root}/{WHEELS}", f"{cache.root}/{MODELS}", cache.incoming_dir):
        files.directory(name=f"Directory {folder}", path=folder, mode="755")
    artifacts_script()
    conf = files.put(name=f"Serve {cache.root} on {endpoint(cache.address, cache.port)} to the fleet's hosts",
                     src=StringIO(render_conf(cache)), dest=paths.CACHE_NGINX_CONF)
    changed = any_changed(conf, default_site)
    server.shell(name="Check the nginx configuration", commands=["nginx -t -q"], _if=changed)
    systemd.service(name="Run nginx", service="nginx", running=True, enabled=True)
    systemd.service(name="Reload nginx on the cache's configuration", service="nginx", reloaded=True, _if=changed)
    for lock in cached_locks(plan):
        wheels_on_cache(name=f"Send the cache the wheels of {lock.release} it lacks", cache=cache, lock=lock)
    for source in cached_models(plan) if with_models else ():
        if source.how == "push":
            model_pushed_to_cache(name=f"Send the cache model {source.model.served_name} ({source.model.dirname})",
                                  cache=cache, source=source)
        else:
            model_downloaded_to_cache(name=f"Download {source.model.model_id} once, to the cache", cache=cache,
                                      source=source)


@deploy("No artifact cache here")
def no_cache_server():
    """A host that is not the cache (any more) serves nothing of it."""
    conf = files.file(name=f"Remove {paths.CACHE_NGINX_CONF} (not the artifact cache)", path=paths.CACHE_NGINX_CONF,
                      present=False)
    systemd.service(name="Reload nginx without the cache", service="nginx", reloaded=True, _if=conf.did_change)


def push_commands(cache: CachePlan, name: str, local_dir: Path, wanted: tuple[ArtifactFile, ...]):
    """``wanted`` (paths relative to ``local_dir``) into ``incoming/NAME`` on the cache, then checked
    there against their sha256: a file damaged on the way fails the operation, and is removed."""
    incoming = f"{cache.incoming_dir}/{name}"
    manifest = f"{cache.incoming_dir}/{name}.json"
    yield StringCommand(shlex.join(["mkdir", "-p", incoming]))
    for folder in sorted({str(Path(f.path).parent) for f in wanted} - {"."}):
        yield StringCommand(shlex.join(["mkdir", "-p", f"{incoming}/{folder}"]))
    for f in wanted:
        yield FileUploadCommand(str(local_dir / f.path), f"{incoming}/{f.path}")
    yield FileUploadCommand(StringIO(manifest_json(wanted)), manifest)
    check = shlex.join(["python3", paths.ARTIFACTS_PATH, "verify", "--manifest", manifest, "--dir", incoming])
    yield StringCommand(f"{check} || {{ rm -rf {shlex.quote(incoming)} {shlex.quote(manifest)}; exit 1; }}")


def missing(wanted: tuple[ArtifactFile, ...], present: dict[str, int]) -> tuple[ArtifactFile, ...]:
    """What is not on the cache yet: absent, or of another size (an interrupted push)."""
    return tuple(f for f in wanted if present.get(f.path) != f.size)


@operation()
def wheels_on_cache(cache: CachePlan, lock: Lock):
    """The lock's wheels the cache lacks, sent from the control node's wheelhouse."""
    wheels = wheel_files(lock)
    lacking = missing(wheels, host.get_fact(FileSizes, folder=cache.wheels_dir))
    if not lacking:
        host.noop(f"the cache holds the {len(wheels)} wheels of {lock.release}")
        return
    name = f"{WHEELS}-{lock.digest[:16]}"
    yield from push_commands(cache, name, build_wheelhouse(lock), lacking)
    incoming = shlex.quote(f"{cache.incoming_dir}/{name}")
    yield StringCommand(f"find {incoming} -maxdepth 1 -name '*.whl' -exec mv -f -t {shlex.quote(cache.wheels_dir)} "
                        f"{{}} + && rm -rf {incoming} {incoming}.json")


@operation()
def model_pushed_to_cache(cache: CachePlan, source: ModelSource):
    """The model's files the cache lacks, from the control node (a local model, or one it downloaded)."""
    folder = cache.model_dir(source.model.dirname)
    if host.get_fact(File, path=f"{folder}/{paths.MODEL_MANIFEST}"):
        host.noop(f"the cache holds {source.model.dirname}")
        return
    incoming = f"{cache.incoming_dir}/{source.model.dirname}"
    lacking = missing(source.files, host.get_fact(FileSizes, folder=incoming))
    if state.is_executing and source.model.local_path is None:
        problem = download_on_control_node(source)
        if problem:
            yield StringCommand(f"echo {shlex.quote(problem)} >&2; exit 1")
            return
    if lacking:
        yield from push_commands(cache, source.model.dirname, source.local_dir, lacking)
    yield from model_in_place(cache, source, incoming)


@operation()
def model_downloaded_to_cache(cache: CachePlan, source: ModelSource):
    """The hub model downloaded on the cache host, once, with the token, every file checked against
    the Hub's digests; a failed download keeps what it checked, and the next deploy resumes."""
    folder = cache.model_dir(source.model.dirname)
    if host.get_fact(File, path=f"{folder}/{paths.MODEL_MANIFEST}"):
        host.noop(f"the cache holds {source.model.dirname}")
        return
    incoming = f"{cache.incoming_dir}/{source.model.dirname}"
    manifest = f"{incoming}.json"
    yield StringCommand(shlex.join(["mkdir", "-p", incoming]))
    yield FileUploadCommand(StringIO(manifest_json(source.files)), manifest)
    yield from hub_download_commands(source, manifest, incoming)
    yield from model_in_place(cache, source, incoming)


def model_in_place(cache: CachePlan, source: ModelSource, incoming: str):
    """The checked model joins what nginx serves, its manifest last: the cache's mark that it is whole."""
    folder, manifest = cache.model_dir(source.model.dirname), f"{incoming}.json"
    yield FileUploadCommand(StringIO(manifest_json(source.files)), manifest)
    yield StringCommand(" && ".join([
        shlex.join(["rm", "-rf", folder]), shlex.join(["mv", "-T", incoming, folder]),
        shlex.join(["chmod", "-R", "a+rX", folder]),
        shlex.join(["mv", manifest, f"{folder}/{paths.MODEL_MANIFEST}"])]))
