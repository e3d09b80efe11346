"""Source readers on generated fixtures in each dataset's published file layout."""
from __future__ import annotations

import pytest

from dart_core.data.records import sample_key
from dart_core.data.records import SourceError
from dart_core.data.sources import open_source
from tests.data_fixtures import NUS_CONCEPTS, OI_IDS, make_coco, make_folder, make_nuswide, make_openimages


def _by_key(src):
    return {r.key: r for r in src.records}


@pytest.mark.parametrize("version", ["v4", "v6", "v7"])
def test_openimages_layouts_and_computed_unseen(tmp_path, version, caplog):
    exp = make_openimages(tmp_path, version)
    src = open_source("openimages", str(tmp_path), split="train", n_unseen=2)
    assert src.vocab.ids == ("/m/000", "/m/001", "/m/002", "/m/003", "/m/007", "/m/004")
    assert src.vocab.splits == ("seen",) * 4 + ("unseen",) * 2
    assert src.vocab.names[0] == "Thing 0"
    pre = exp["prefix"]
    assert src.split_rule == (
        f"unseen = 2 MIDs: the non-trainable classes with the most positive human labels in "
        f"{pre}train-annotations-human-imagelabels.csv (asked for 2; no unseen.txt or top_400_unseen.csv + "
        f"unseen_labels.pkl in {tmp_path}); seen = 4 MIDs: {pre}classes-trainable.txt (4) minus the unseen ones "
        f"(0 in both lists)")
    recs = _by_key(src)
    assert set(recs) == set(exp["ok"]) | set(exp["failed"])
    for k, lab in exp["ok"].items():
        assert recs[k].error is None and recs[k].labels == lab
        assert recs[k].path == str(tmp_path / "train" / f"{k}.jpg")
        assert recs[k].source["file"] == f"{k}.jpg" and recs[k].source["image_id"] == k
    for k, reason in exp["failed"].items():
        assert recs[k].error[0] == reason
    # the malformed confidence cost one label, with a warning naming file:line
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{exp['labels']}:{exp['bad_conf_line']}: confidence '0.5' is not 0 or 1; /m/000 is unknown for image "
        f"{'b' * 16}"]


def test_openimages_given_unseen_list(tmp_path):
    make_openimages(tmp_path, "v6")
    (tmp_path / "unseen.txt").write_text("/m/005\n/m/006\n")
    src = open_source("openimages", str(tmp_path))
    assert src.vocab.ids[4:] == ("/m/005", "/m/006") and src.vocab.unseen_mask.sum() == 2
    assert src.split_rule == ("unseen = 2 MIDs listed in unseen.txt; seen = 4 MIDs: oidv6-classes-trainable.txt (4) "
                              "minus the unseen ones (0 in both lists)")
    recs = _by_key(src)
    assert recs[OI_IDS[0]].labels == {"/m/000": 1, "/m/001": -1, "/m/005": 1}
    assert recs[OI_IDS[1]].labels == {"/m/000": 1, "/m/001": -1}   # /m/004, /m/007 now outside


def test_openimages_unseen_list_wins_over_trainable(tmp_path):
    """A hand-written unseen.txt naming trainable MIDs makes them unseen (they are not trained on)."""
    make_openimages(tmp_path, "v6")
    (tmp_path / "unseen.txt").write_text("/m/005\n/m/001\n")
    src = open_source("openimages", str(tmp_path))
    assert src.vocab.ids == ("/m/000", "/m/002", "/m/003", "/m/005", "/m/001")
    assert src.vocab.splits == ("seen",) * 3 + ("unseen",) * 2
    assert src.split_rule == ("unseen = 2 MIDs listed in unseen.txt; seen = 3 MIDs: oidv6-classes-trainable.txt (4) "
                              "minus the unseen ones (1 in both lists)")
    assert _by_key(src)[OI_IDS[0]].labels == {"/m/000": 1, "/m/001": -1, "/m/005": 1}


def test_openimages_missing_file_is_run_error(tmp_path):
    make_openimages(tmp_path, "v6")
    (tmp_path / "oidv6-classes-trainable.txt").unlink()
    with pytest.raises(SourceError) as e:
        open_source("openimages", str(tmp_path))
    assert str(e.value) == (f"{tmp_path}: no Open Images trainable classes file found "
                            f"(looked for [oidv7-|oidv6-]classes-trainable.txt in {tmp_path})")


def test_nuswide_layout(tmp_path, caplog):
    exp = make_nuswide(tmp_path)
    src = open_source("nuswide", str(tmp_path), split="train")
    # seen = tags minus the concepts (sky, dog), in TagList order; unseen = the concepts
    assert src.vocab.ids == ("sunset", "car", "tree", "beach", "sky", "dog", "animal")
    assert src.vocab.splits == ("seen",) * 4 + ("unseen",) * 3
    assert src.split_rule == ("seen = 4 tags: TagList1k.txt (6) minus the concepts (2 in both lists); "
                              "unseen = 3 concepts: Concepts81.txt")
    recs = _by_key(src)
    assert set(recs) == set(exp["ok"]) | set(exp["failed"])
    for k, lab in exp["ok"].items():
        assert recs[k].labels == lab and recs[k].error is None
    assert recs[sample_key("actor/0001_2124494179.jpg")].path == str(tmp_path / "Flickr" / "actor" / "0001_2124494179.jpg")
    assert recs[sample_key("beach/0005_77.jpg")].error == (
        "malformed_label", "NUS_WID_Tags/Train_Tags1k.dat:5: expected 6 values of 0/1, got 3")
    assert {k: r.source["file"] for k, r in recs.items()} == exp["files"]
    assert recs[sample_key("beach/0003_1234.jpg")].source["listed"] == "C:\\ImageData\\Flickr\\beach\\0003_1234.jpg"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == exp["warnings"]
    assert len(NUS_CONCEPTS) == src.vocab.unseen_mask.sum()


def test_nuswide_length_mismatch_names_file(tmp_path):
    make_nuswide(tmp_path)
    (tmp_path / "Groundtruth/TrainTestLabels/Labels_dog_Train.txt").write_text("0\n1\n")
    with pytest.raises(SourceError, match="Labels_dog_Train.txt: 2 rows"):
        open_source("nuswide", str(tmp_path), split="train")


def test_coco_zero_shot_split(tmp_path):
    exp = make_coco(tmp_path)
    src = open_source("coco", str(tmp_path))  # the only instances file -> split val2014
    assert src.split == "val2014"
    assert len(src.vocab) == 65 and src.vocab.unseen_mask.sum() == 17
    assert src.split_rule == ("seen = 48, unseen = 17 categories: the zero-shot split of Bansal et al. 2018 "
                              "(coco_zeroshot.json); the file's other categories are ignored")
    assert set(src.vocab.names) == set(exp["seen"]) | set(exp["unseen"])
    assert {n for n, s in zip(src.vocab.names, src.vocab.splits) if s == "unseen"} == set(exp["unseen"])
    assert "fire hydrant" not in src.vocab.names
    recs = _by_key(src)
    assert sorted(recs) == [f"COCO_val2014_{i:012d}" for i in (10, 11, 12, 13)]
    cid = exp["cid"]
    lab = recs["COCO_val2014_000000000010"].labels
    assert len(lab) == 65 and lab[str(cid["person"])] == 1 and lab[str(cid["cat"])] == 1
    assert sum(v == 1 for v in lab.values()) == 2
    assert recs["COCO_val2014_000000000010"].source == {"dataset": "coco", "split": "val2014", "image_id": 10,
                                                        "file": "COCO_val2014_000000000010.jpg"}
    assert set(recs["COCO_val2014_000000000011"].labels.values()) == {-1}  # only an out-of-split instance
    assert recs["COCO_val2014_000000000012"].error[0] == "unknown_class"


def test_folder_source_rows(tmp_path):
    exp = make_folder(tmp_path / "src")
    src = open_source("folder", str(tmp_path / "src"))
    assert src.vocab.ids == ("cat", "dog", "bird") and src.vocab.splits[2] == "unseen"
    assert src.split_rule == "seen = 2, unseen = 1 classes: the split column of classes.csv"
    recs = list(src.records)
    assert len(recs) == exp["inputs"]
    pre = {r.key: r.error[0] for r in recs if r.error}
    assert pre == {sample_key("../outside.jpg"): "path_escapes_source", sample_key("img/g_unknown.jpg"): "unknown_class"}


def test_folder_without_classes_csv_and_bad_header(tmp_path):
    make_folder(tmp_path / "src", with_classes=False)
    src = open_source("folder", str(tmp_path / "src"))
    assert src.vocab.ids == ("bird", "cat", "dog") and set(src.vocab.splits) == {"seen"}
    assert src.split_rule == "seen = 3, unseen = 0 classes: every label of labels.csv, all seen (no classes.csv)"
    (tmp_path / "src" / "labels.csv").write_text("file,tags\nx.jpg,a\n")
    with pytest.raises(SourceError, match="header must be path,labels"):
        open_source("folder", str(tmp_path / "src"))


def test_folder_label_marks_and_absent_rule(tmp_path):
    from dart_core.data.sources.folder import parse_labels

    assert parse_labels("cat|?dog|-bird") == {"cat": 1, "dog": 0, "bird": -1}
    for bad, why in (("cat|?cat", "both positive and unknown"), ("-dog|?dog", "both negative and unknown"),
                     ("?", "malformed"), ("?-cat", "malformed"), ("cat||dog", "malformed")):
        with pytest.raises(ValueError, match=why):
            parse_labels(bad)
    (tmp_path / "labels.csv").write_text("path,labels\na.jpg,cat|?dog\nb.jpg,cat|?cat\n")
    (tmp_path / "classes.csv").write_text("id,name,split\ncat,cat,seen\ndog,dog,seen\nbird,bird,unseen\n")
    recs = list(open_source("folder", str(tmp_path)).records)
    assert recs[0].labels == {"cat": 1, "bird": -1} and recs[0].error is None
    assert recs[1].error == ("malformed_label", "labels.csv:3: label 'cat' is both positive and unknown")
    assert list(open_source("folder", str(tmp_path), absent="unknown").records)[0].labels == {"cat": 1}
    with pytest.raises(SourceError, match=r"--absent 'maybe': must be one of negative\|unknown"):
        open_source("folder", str(tmp_path), absent="maybe")


def test_folder_symlinks_out_of_the_source_are_refused(tmp_path):
    """A path that resolves outside the source folder — through a linked file or a linked folder —
    is a failed row; links that stay inside are followed."""
    from dart_core.data.sources.folder import resolve_inside

    root, outside = tmp_path / "src", tmp_path / "elsewhere"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"x")
    (root / "img" / "real.jpg").write_bytes(b"x")
    (root / "img" / "file_out.jpg").symlink_to(outside / "secret.jpg")
    (root / "dir_out").symlink_to(outside)
    (root / "img" / "file_in.jpg").symlink_to(root / "img" / "real.jpg")
    (root / "dir_in").symlink_to(root / "img")
    base = str(root.resolve())
    assert resolve_inside(str(root), "img/real.jpg") == f"{base}/img/real.jpg"
    assert resolve_inside(str(root), "img/file_in.jpg") == f"{base}/img/file_in.jpg"
    assert resolve_inside(str(root), "dir_in/real.jpg") == f"{base}/dir_in/real.jpg"
    assert resolve_inside(str(root), "img/file_out.jpg") is None
    assert resolve_inside(str(root), "dir_out/secret.jpg") is None
    assert resolve_inside(str(root), "img/../../elsewhere/secret.jpg") is None
    # a sibling whose name starts with the root's name is outside too
    (tmp_path / "src2").mkdir()
    (tmp_path / "src2" / "a.jpg").write_bytes(b"x")
    (root / "img" / "sib.jpg").symlink_to(tmp_path / "src2" / "a.jpg")
    assert resolve_inside(str(root), "img/sib.jpg") is None
