"""Where the fleet's model comes from in this run, worked out on the control node before any host
is touched (``check_sources``): a local model's files and checksums; or a hub model's files with
the sizes and digests the Hub publishes for the pinned revision, asked of the Hub (or the
operator's mirror, ``vllm_hf_endpoint``, else the control node's ``HF_ENDPOINT``) with the token
from the secrets folder. A gated model without a token, a token the Hub refuses, a revision it does
not know or a Hub that cannot be reached stops the deploy here, naming the setting.

The token is handed only to the download: kept on the control node for ``vllm_hub_download =
control``, else written root-only to ``/run`` on the host that downloads, where the download
removes it before it connects (``roles/files/artifacts.py``).
"""

from __future__ import annotations

import fnmatch
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from roles import secrets
from roles.common import ArtifactFile, manifest_json
from roles.errors import FleetConfigError
from roles.files import artifacts
from roles.plan.edge import Secret, read_key_file
from roles.plan.fleet import FleetPlan, HostPlan, Model

HUB_TOKEN_FILE = "hub.token"
SET_TOKEN = "`vllm-fleet keys hub {folder}` (it asks for the token without showing it)"
# Where a model downloaded on the control node (vllm_hub_download = control) waits to be sent to the cache.
CONTROL_DOWNLOADS = Path("~/.cache/vllm-fleet/models").expanduser()
# What a snapshot holds that vLLM never reads when it has safetensors weights: the same weights in
# other formats (Meta's repositories carry a second copy under original/), and the repository's own files.
SKIPPED_BESIDE_SAFETENSORS = ("*.bin", "*.pt", "*.pth", "*.gguf", "*.msgpack", "*.h5", "original/*")
SKIPPED_ALWAYS = (".gitattributes",)


@dataclass(frozen=True)
class ModelSource:
    """The fleet's model as this run stages it: its files, and how they reach the cache or the hosts.

    ``how``: ``push`` (from ``local_dir`` on the control node to the cache, once), ``cache`` (the
    cache host downloads ``url`` once), ``hosts`` (every host downloads ``url``)."""

    model: Model
    files: tuple[ArtifactFile, ...]
    how: str
    url: str | None = None  # the Hub's resolve URL of the revision, ending in "/"
    token: Secret | None = None
    local_dir: Path | None = None


def hub_endpoint(setting: str | None) -> str:
    """vllm_hf_endpoint, else the control node's HF_ENDPOINT, else huggingface_hub's default."""
    if setting:
        return setting.rstrip("/")
    from huggingface_hub import constants  # reads HF_ENDPOINT

    return constants.ENDPOINT.rstrip("/")


def hub_token(secrets_dir: Path) -> Secret | None:
    """The Hub token in the secrets folder, if one is stored there."""
    path = secrets_dir / HUB_TOKEN_FILE
    if not path.is_file():
        return None
    return read_key_file(path, "an HTTP header", f"store the token again with {SET_TOKEN.format(folder=secrets_dir)}")


def wanted(files: tuple[ArtifactFile, ...]) -> tuple[ArtifactFile, ...]:
    """The files of a snapshot worth downloading (see SKIPPED_BESIDE_SAFETENSORS)."""
    skipped = SKIPPED_ALWAYS
    if any(f.path.endswith(".safetensors") for f in files):
        skipped += SKIPPED_BESIDE_SAFETENSORS
    return tuple(f for f in files if not any(fnmatch.fnmatch(f.path, pattern) for pattern in skipped))


@lru_cache(maxsize=8)
def snapshot_files(model_id: str, revision: str, endpoint: str, token: Secret | None,
                   secrets_dir: Path) -> tuple[ArtifactFile, ...]:
    """Every file of ``model_id`` at ``revision`` with the size and digest the Hub publishes (the
    LFS sha256, else the git blob id); refused with the reason when the Hub will not say. Asked once
    per run and model (the deploy file runs once per host), whatever the number of hosts."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    field, store = "`vllm_model_id`", SET_TOKEN.format(folder=secrets_dir)
    try:
        info = HfApi(endpoint=endpoint, token=token.reveal() if token else False).model_info(
            model_id, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise FleetConfigError(field, _refused(model_id, endpoint, token, secrets_dir, "is gated"),
                               f"store the token of an account the repository admits with {store}; it is handed "
                               "to the download alone.") from None
    except RevisionNotFoundError:
        raise FleetConfigError("`vllm_model_revision`", f"{endpoint} has no revision {revision} of "
                               f"{model_id}.", "set it to a commit of the repository (40 hex digits).") from None
    except RepositoryNotFoundError:
        raise FleetConfigError(field, _refused(model_id, endpoint, token, secrets_dir, "is not there or is private"),
                               f"check the model id, or store a token that may read it with {store}.") from None
    except HfHubHTTPError as error:
        raise FleetConfigError(field, f"{endpoint} answered HTTP {error.response.status_code} when asked for "
                               f"{model_id} at {revision}.", "retry later, or set vllm_hf_endpoint to a mirror that "
                               "serves it.") from None
    except Exception as error:
        if not _unreachable(error):
            raise
        raise FleetConfigError(field, f"the Hub at {endpoint} cannot be reached from the control node: "
                               f"{type(error).__name__}: {error}.",
                               "set vllm_hf_endpoint (or HF_ENDPOINT) to a Hub mirror this machine reaches; the "
                               "revision's file list and digests are checked here before any host is touched.") \
            from None
    return tuple(ArtifactFile(s.rfilename, s.size, sha256=s.lfs.sha256) if s.lfs else
                 ArtifactFile(s.rfilename, s.size, git_sha1=s.blob_id) for s in info.siblings)


def _unreachable(error: Exception) -> bool:
    """A connection that failed: huggingface_hub's transport (httpx2, httpx or requests, by its
    version) has no error class in common with the socket's own."""
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in ("httpx", "httpx2", "requests")


def _refused(model_id: str, endpoint: str, token: Secret | None, secrets_dir: Path, why: str) -> str:
    held = f"the token in {secrets_dir / HUB_TOKEN_FILE} is refused" if token else \
        f"{secrets_dir / HUB_TOKEN_FILE} holds no token"
    return f"{model_id} at {endpoint} {why}: {held}."


def model_source(plan: FleetPlan, host_plan: HostPlan) -> ModelSource:
    """Where ``host_plan``'s model comes from in this run."""
    model = host_plan.model
    if model.local_path is not None:
        return ModelSource(model, model.files, "push", local_dir=model.local_path)
    endpoint, token = hub_endpoint(host_plan.get("vllm_hf_endpoint")), hub_token(plan.secrets_dir)
    try:
        files = wanted(snapshot_files(model.model_id, model.revision, endpoint, token, plan.secrets_dir))
    except FleetConfigError as refused:
        raise FleetConfigError(f"host {host_plan.name}: {refused.field}", refused.problem, refused.fix) from None
    how = host_plan.get("vllm_hub_download")
    url = f"{endpoint}/{model.model_id}/resolve/{model.revision}/"
    if how == "control":
        return ModelSource(model, files, "push", url=url, token=token, local_dir=CONTROL_DOWNLOADS / model.dirname)
    return ModelSource(model, files, how, url=url, token=token)


def check_sources(plan: FleetPlan) -> None:
    """Every host's model source, asked for once before any operation: the Hub's refusals stop the run here."""
    for host_plan in plan.hosts:
        model_source(plan, host_plan)


def download_on_control_node(source: ModelSource) -> str | None:
    """``vllm_hub_download = control``: the snapshot into ``source.local_dir`` on this machine, every
    file checked against the Hub's digests (what is there and right already is kept, so a failed
    download resumes). None when done, else what went wrong (the download printed which file and why)."""
    folder = source.local_dir
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vllm-fleet-hub-") as private:  # made 0700
        manifest = Path(private) / "manifest.json"
        manifest.write_text(manifest_json(source.files))
        argv = ["fetch", "--base-url", source.url, "--manifest", str(manifest), "--dest", str(folder)]
        if source.token is not None:
            token_file = Path(private) / "token"  # the fetch removes it once read
            secrets.write_private(token_file, source.token.reveal().encode())
            argv += ["--token-file", str(token_file)]
        returncode = artifacts.main(argv)
    if returncode == 0:
        return None
    return (f"downloading {source.model.model_id} on the control node failed (exit {returncode}; its output names "
            f"each file and why); the files already checked stay in {folder}, deploy again to resume")
