"""roles/files/textfile.py, what the textfile scripts share (gpu_metrics.py, edge_metrics.py): the
exposition of metric families, the .prom file written whole or not at all, and the state kept
between runs. Imported as the scripts import it on a host: the top-level module ``textfile``."""

import stat
import sys

import pytest

from roles.paths import HOST_SCRIPTS
from tests.unit.gpu_scripts import label_sets, parse_exposition, value

if str(HOST_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(HOST_SCRIPTS))

import textfile  # noqa: E402  (from roles/files/, as on a host)


def test_families_are_written_whole_and_one_without_samples_is_left_out():
    text = textfile.exposition("p_", [
        ("up", "gauge", "1 when up.", [({}, True)]),
        ("none", "counter", "Never sampled.", []),
        ("ratio", "gauge", 'A \\ help\nover two lines.', [({"gpu": "0"}, 0.5), ({"gpu": "1"}, 1)]),
    ])
    assert text.splitlines() == ["# HELP p_up 1 when up.", "# TYPE p_up gauge", "p_up 1",
                                 "# HELP p_ratio A \\\\ help\\nover two lines.", "# TYPE p_ratio gauge",
                                 'p_ratio{gpu="0"} 0.5', 'p_ratio{gpu="1"} 1']
    assert text.endswith("\n") and "p_none" not in text


def test_label_values_are_escaped():
    strange = 'NVIDIA "H200"\\x\nnew'
    series = parse_exposition(textfile.exposition("p_", [("info", "gauge", "x", [({"model": strange}, 1)])]))
    assert label_sets(series, "p_info") == [{"model": strange}] and value(series, "p_info", model=strange) == 1


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "vllm-fleet-edge.prom"
    target.write_text("old\n")

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(textfile.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        textfile.write_atomically(str(target), "new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [target.name]
    monkeypatch.undo()
    textfile.write_atomically(str(target), "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == [target.name]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # the node exporter's user reads it


def test_the_state_is_root_only_and_a_lost_or_broken_one_starts_from_nothing(tmp_path, capsys):
    path = tmp_path / "state.json"

    def load():
        return textfile.load_state(str(path), "edge_metrics", "counting again from 0")

    assert load() == {}
    textfile.save_state(str(path), {"offset": 10, "counts": {"200": 3}})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and load() == {"offset": 10, "counts": {"200": 3}}
    assert capsys.readouterr().err == ""  # missing or read: nothing to say
    for broken in ("{not json", "[1, 2]"):
        path.write_text(broken)
        assert load() == {}
    assert capsys.readouterr().err.splitlines() == [
        f"edge_metrics: {path} unreadable (Expecting property name enclosed in double quotes: line 1 column 2 "
        "(char 1)): counting again from 0"]
