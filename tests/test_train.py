"""Training: convergence on a fixed batch, checkpoints, resume, non-finite loss, bad input, DDP."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dart_core.checkpoint import CheckpointError, check_vocabulary, load_model, read_checkpoint
from dart_core.metrics import mean_average_precision
from dart_core.train import NonFiniteLossError, TrainConfig, fit, lambda_at, lr_at
from dart_core.vocab import Vocabulary, VocabularyError
from tests.conftest import REPO, free_port
from tests.model_fixtures import NAMES, fixed_batch, other_clip_ckpt, tiny_clip_ckpt, tiny_model, vocab  # noqa: F401

FAST = dict(lr=1e-3, min_lr=1e-4, warmup_epochs=2, log_every=10_000)


def quiet(*_):
    pass


def test_schedules():
    # warm-up: linear to lr over 2 epochs of 10 steps, then cosine to min_lr
    assert lr_at(0, 100, 20, 1e-4, 1e-5) == pytest.approx(1e-4 / 20)
    assert lr_at(19, 100, 20, 1e-4, 1e-5) == pytest.approx(1e-4)
    assert lr_at(60, 100, 20, 1e-4, 1e-5) == pytest.approx(1e-5 + 0.5 * 9e-5)
    assert lr_at(100, 100, 20, 1e-4, 1e-5) == pytest.approx(1e-5)
    assert lambda_at(0, 11) == 1.0 and lambda_at(5, 11) == pytest.approx(0.5) and lambda_at(10, 11) == 0.0


def test_progress_rate_and_eta():
    from dart_core.train import progress

    # 10 steps of 256 images in 20 s: 128 img/s; 90 steps left at 2 s each: 3 minutes
    assert progress(10, 90, 20.0, 256) == "128 img/s, 0m20s elapsed, ETA 3m00s"
    assert progress(100, 2000, 3600.0, 64) == "2 img/s, 1h00m elapsed, ETA 20h00m"
    assert progress(0, 10, 0.4, 64) == "0m00s elapsed"


def test_few_hundred_steps_drive_loss_down_and_map_up(tiny_model, vocab, tmp_path):
    x, y = fixed_batch(16)
    tiny_model.eval()
    with torch.no_grad():
        map0 = mean_average_precision(tiny_model(x).logits.numpy(), y.numpy())
    hist = fit(tiny_model, [(x[:8], y[:8]), (x[8:], y[8:])], vocab, tmp_path, TrainConfig(epochs=150, **FAST), log=quiet)
    assert len(hist) == 300
    with torch.no_grad():
        map1 = mean_average_precision(tiny_model(x).logits.numpy(), y.numpy())
    first, last = np.mean([h["total"] for h in hist[:10]]), np.mean([h["total"] for h in hist[-10:]])
    assert last < 0.5 * first
    assert map1 > map0 + 0.15, (map0, map1)


def test_save_load_identical_scores_and_weights_only(tiny_model, vocab, tmp_path, tiny_clip_ckpt):
    x, y = fixed_batch(16)
    fit(tiny_model, [(x, y)], vocab, tmp_path, TrainConfig(epochs=3, **FAST), log=quiet)
    with torch.no_grad():
        ref = tiny_model(x).logits
    doc = read_checkpoint(tmp_path / "model.pt")
    # only trainable weights are stored: no backbone tensor in the file
    assert doc["state_dict"] and all(k.startswith(("arm.", "atm.", "patch_gate")) for k in doc["state_dict"])
    assert sum(v.numel() for v in doc["state_dict"].values()) == tiny_model.parameter_counts()["trainable"]
    loaded, _ = load_model(tmp_path / "model.pt")
    loaded.set_classes(NAMES, tiny_model.edge_index)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


def test_checkpoint_refuses_other_backbone_and_vocabulary(tiny_model, vocab, tmp_path, other_clip_ckpt):
    x, y = fixed_batch(8)
    fit(tiny_model, [(x, y)], vocab, tmp_path, TrainConfig(epochs=1, **FAST), log=quiet)
    with pytest.raises(CheckpointError, match="weights"):
        load_model(tmp_path / "model.pt", pretrained=other_clip_ckpt)
    with pytest.raises(CheckpointError, match="trained on backbone 'dart-tiny-vit'"):
        load_model(tmp_path / "model.pt", backbone="ViT-B-16")
    doc = read_checkpoint(tmp_path / "model.pt")
    smaller = Vocabulary.from_names(NAMES[:-1])
    with pytest.raises(CheckpointError, match="trained class 'boat'"):
        check_vocabulary(doc, smaller, "ckpt")
    renamed = Vocabulary(vocab.ids, vocab.names[:-1] + ("ship",), vocab.splits)
    with pytest.raises(CheckpointError, match="'boat' in training"):
        check_vocabulary(doc, renamed, "ckpt")
    bigger = vocab.extend(Vocabulary.from_names(["zebra"], unseen={"zebra"}))
    check_vocabulary(doc, bigger, "ckpt")  # adding classes at inference is fine
    with pytest.raises(CheckpointError, match="vocabulary"):
        check_vocabulary(doc, bigger, "ckpt", exact=True)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        read_checkpoint(tmp_path / "junk.pt")


def test_label_shape_mismatch_is_named(tiny_model, vocab, tmp_path):
    x, y = fixed_batch(4)
    with pytest.raises(ValueError, match="labels have 5 classes, the vocabulary has 6"):
        fit(tiny_model, [(x, y[:, :5])], vocab, tmp_path, TrainConfig(epochs=1, **FAST), log=quiet)


def test_vocabulary_errors_name_the_row(tmp_path):
    p = tmp_path / "classes.csv"
    p.write_text("id,name,split\n/m/1,cat,seen\n/m/2,,seen\n")
    with pytest.raises(VocabularyError, match="line 3: empty class name"):
        Vocabulary.read_csv(p)
    p.write_text("id,name,split\n/m/1,cat,seen\n/m/1,dog,seen\n")
    with pytest.raises(VocabularyError, match="line 3: duplicate class id '/m/1'"):
        Vocabulary.read_csv(p)
    p.write_text("id,name,split\n/m/1,cat,seen\n/m/2,Cat ,unseen\n")
    with pytest.raises(VocabularyError, match="duplicate class name"):
        Vocabulary.read_csv(p)


def test_crg_naming_unknown_class_is_an_error(tmp_path, vocab):
    from dart_core.crg.graph import CRG, CRGError

    bad = {"classes": [{"id": "cat", "name": "cat"}], "neighbors": {"cat": ["unicorn"]}}
    (tmp_path / "crg.json").write_text(json.dumps(bad))
    with pytest.raises(CRGError, match="unknown neighbour 'unicorn'"):
        CRG.read(tmp_path / "crg.json")
    crg = CRG(["cat", "unicorn"], ["cat", "unicorn"], {"cat": ["unicorn"]})
    with pytest.raises(CRGError, match="'unicorn' is not in the vocabulary"):
        crg.edge_index(vocab)


class Crash(Exception):
    pass


def seeded_model(clip_ckpt, vocab):
    """The same tiny DART every call (seed 0, a random CRG): runs compared step by step start equal."""
    from dart_core.crg.graph import random_crg
    from dart_core.model import DART
    from tests.model_fixtures import tiny_config

    torch.manual_seed(0)
    m = DART(tiny_config(pretrained=clip_ckpt))
    m.set_classes(NAMES, random_crg(vocab, 2, seed=0).edge_index(vocab))
    return m


class CrashingData:
    """Yields the batches, but raises after `crash_after` batches in total (a simulated kill)."""

    def __init__(self, batches, crash_after):
        self.batches, self.left = batches, crash_after

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            if self.left == 0:
                raise Crash()
            self.left -= 1
            yield b


def test_resume_after_crash_matches_uninterrupted(tiny_clip_ckpt, vocab, tmp_path):
    def new_model():
        return seeded_model(tiny_clip_ckpt, vocab)

    x, y = fixed_batch(12)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    cfg = TrainConfig(epochs=4, **FAST)
    ref = fit(new_model(), batches, vocab, tmp_path / "a", cfg, log=quiet)
    with pytest.raises(Crash):
        fit(new_model(), CrashingData(batches, crash_after=7), vocab, tmp_path / "b", cfg, log=quiet)
    assert read_checkpoint(tmp_path / "b" / "last.pt")["step"] == 6  # two whole epochs were saved
    resumed = fit(new_model(), batches, vocab, tmp_path / "b", cfg, log=quiet)
    assert [h["step"] for h in resumed] == list(range(1, 13))
    np.testing.assert_allclose([h["total"] for h in resumed], [h["total"] for h in ref], rtol=1e-5)


def test_checkpoint_every_resumes_mid_epoch(tiny_clip_ckpt, vocab, tmp_path):
    """checkpoint_every=2 with 3 steps an epoch: a crash in step 6 finds last.pt at step 4 (the
    middle of epoch 2), and the resumed run continues from step 5 with the uninterrupted losses."""
    def new_model():
        return seeded_model(tiny_clip_ckpt, vocab)

    x, y = fixed_batch(12)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    cfg = TrainConfig(epochs=3, checkpoint_every=2, **FAST)
    ref = fit(new_model(), batches, vocab, tmp_path / "a", cfg, log=quiet)
    with pytest.raises(Crash):
        fit(new_model(), CrashingData(batches, crash_after=5), vocab, tmp_path / "b", cfg, log=quiet)
    saved = read_checkpoint(tmp_path / "b" / "last.pt")
    assert saved["step"] == 4 and saved["train_config"]["checkpoint_every"] == 2
    resumed = fit(new_model(), batches, vocab, tmp_path / "b", cfg, log=quiet)
    assert [h["step"] for h in resumed if "total" in h] == list(range(1, 10))
    np.testing.assert_allclose([h["total"] for h in resumed if "total" in h],
                               [h["total"] for h in ref if "total" in h], rtol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_model, vocab, tmp_path):
    x, y = fixed_batch(8)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    fit(tiny_model, [(x, y)], vocab, tmp_path, TrainConfig(epochs=2, **FAST), log=quiet)
    good = read_checkpoint(tmp_path / "last.pt")
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 3 step 2") as e:
        fit(tiny_model, [(bad, y)], vocab, tmp_path, TrainConfig(epochs=4, **FAST), log=quiet)
    assert "last.pt" in str(e.value)
    after = read_checkpoint(tmp_path / "last.pt")
    assert after["step"] == good["step"] == 2
    assert all(torch.equal(after["state_dict"][k], good["state_dict"][k]) for k in good["state_dict"])


def test_torchrun_two_gloo_processes_match_one_process(tiny_clip_ckpt, tmp_path):
    """DDP over 2 CPU processes (gloo) with batch b each == 1 process with batch 2b."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = str(REPO / "tests" / "ddp_train_script.py")
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run([sys.executable, script, str(single), tiny_clip_ckpt, "8"], check=True, env=env, cwd=REPO,
                   timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                    script, str(multi), tiny_clip_ckpt, "8"], check=True, env=env, cwd=REPO, timeout=300)
    a = json.load(open(single / "losses.json"))
    b = json.load(open(multi / "losses.json"))
    assert len(a["total"]) == len(b["total"]) == 12
    # the per-class ranking and the WPS threshold compare images across the whole batch: under DDP
    # they see every rank's rows (gathered), so the run is the one-process run with the doubled batch
    np.testing.assert_allclose(b["total"], a["total"], rtol=1e-4)
    np.testing.assert_allclose(b["rank_class"], a["rank_class"], rtol=1e-4)
    # 4 batches an epoch: each batch's loss is lower two epochs later
    assert all(a["total"][i + 8] < a["total"][i] for i in range(4)), a["total"]


def test_relative_pretrained_path_is_stored_resolved_with_its_hash(tiny_clip_ckpt, other_clip_ckpt, vocab,
                                                                     tmp_path, monkeypatch):
    import hashlib
    import shutil

    from dart_core.model import DART
    from tests.model_fixtures import tiny_config

    a, b = tmp_path / "a", tmp_path / "b"
    (a / "weights").mkdir(parents=True)
    b.mkdir()
    shutil.copy(tiny_clip_ckpt, a / "weights" / "clip.pt")
    sha = hashlib.sha256((a / "weights" / "clip.pt").read_bytes()).hexdigest()
    x, y = fixed_batch(8)

    def model(pretrained):
        torch.manual_seed(0)
        m = DART(tiny_config(pretrained=pretrained))
        m.set_classes(NAMES)
        return m

    monkeypatch.chdir(a)
    m = model("weights/clip.pt")  # relative, as typed on the command line
    fit(m, [(x, y)], vocab, "run", TrainConfig(epochs=1, **FAST), log=quiet)
    doc = read_checkpoint(a / "run" / "model.pt")
    assert doc["config"]["pretrained"] == str(a / "weights" / "clip.pt")
    assert doc["backbone"]["pretrained"] == str(a / "weights" / "clip.pt")
    assert doc["backbone"]["pretrained_sha256"] == sha
    with torch.no_grad():
        ref = m(x).logits
    # annotating from another working directory: the checkpoint still finds its backbone
    monkeypatch.chdir(b)
    loaded, _ = load_model(a / "run" / "model.pt")
    loaded.set_classes(NAMES)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    # weights gone from where the checkpoint says: named, not a bare "not found"
    (a / "weights" / "clip.pt").rename(a / "moved.pt")
    with pytest.raises(CheckpointError, match=f"trained on the backbone weights {a / 'weights' / 'clip.pt'} "
                                              rf"\(sha256 {sha[:16]}\), which are no longer there"):
        load_model(a / "run" / "model.pt")
    # resume compares the file's content, not the spelling of its path: the same bytes under
    # another name resume; other bytes under the first run's relative spelling are refused
    hist = fit(model("../a/moved.pt"), [(x, y)], vocab, a / "run", TrainConfig(epochs=2, **FAST), log=quiet)
    assert [h["step"] for h in hist if "total" in h] == [1, 2]
    assert read_checkpoint(a / "run" / "last.pt")["backbone"]["pretrained"] == str(a / "moved.pt")
    (b / "weights").mkdir()
    shutil.copy(other_clip_ckpt, b / "weights" / "clip.pt")
    other_sha = hashlib.sha256((b / "weights" / "clip.pt").read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=rf"run/last.pt: was trained on other backbone weights \(weights "
                                         rf"{a / 'moved.pt'} \(sha256 {sha[:16]}\) vs {b / 'weights' / 'clip.pt'} "
                                         rf"\(sha256 {other_sha[:16]}\)\); use a new --out"):
        fit(model("weights/clip.pt"), [(x, y)], vocab, a / "run", TrainConfig(epochs=3, **FAST), log=quiet)
