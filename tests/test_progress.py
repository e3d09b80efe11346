"""Progress output: a live bar on a terminal, plain periodic lines in a log."""
import json
import time

from dart_core.progress import progress_bar


def test_log_lines_carry_count_rate_and_eta_and_short_runs_stay_silent():
    lines = []
    bar = progress_bar(total=100, desc="annotate", log=lines.append, every=0.2, terminal=False)
    for _ in range(4):
        bar.update(10)
        time.sleep(0.25)
    bar.close()
    assert lines, "a run longer than `every` logs its pace"
    assert all("\r" not in ln and ln.startswith("annotate: ") for ln in lines)
    assert len(set(lines)) == len(lines)  # no repeated redraws
    last = lines[-1]
    assert "/100 img (" in last and "img/s" in last and "elapsed, ETA" in last

    quiet = []
    bar = progress_bar(total=100, desc="annotate", log=quiet.append, every=30, terminal=False)
    bar.update(100)
    bar.close()
    assert quiet == []  # shorter than `every`: the command's own summary is enough

    unknown = []
    bar = progress_bar(desc="shard out", log=unknown.append, every=0.1, terminal=False)
    bar.update(5)
    time.sleep(0.15)
    bar.update(5)
    bar.close()
    assert unknown and unknown[-1].startswith("shard out: 10 img, ") and "ETA" not in unknown[-1]


def test_disabled_bar_says_nothing(capsys):
    bar = progress_bar(total=10, desc="x", enabled=False)
    bar.update(10)
    bar.close()
    assert capsys.readouterr().err == ""


def test_annotate_progress_total_comes_from_the_stats_files(tmp_path):
    from dart_core.data.reader import shard_sample_counts

    (tmp_path / "000000_stats.json").write_text(json.dumps({"ok": 7, "failed": 2}))
    (tmp_path / "000001_stats.json").write_text(json.dumps({"ok": 3, "failed": 0}))
    urls = [str(tmp_path / "000000.tar"), str(tmp_path / "000001.tar"), str(tmp_path / "000002.tar")]
    assert shard_sample_counts(urls) == [7, 3, 0]  # failed inputs are not images; no stats: 0
