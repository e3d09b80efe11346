"""`dart train` over webdataset shards and `dart info`, through the CLI."""
import json

from typer.testing import CliRunner

from flows.cli import app
from tests.annotate_fixtures import COLOURS, make_shards
from tests.model_fixtures import tiny_clip_ckpt  # noqa: F401


def test_dart_train_over_shards_and_resume(tmp_path, tiny_clip_ckpt, prefect_harness):
    from dart_core.checkpoint import read_checkpoint
    from dart_core.vocab import Vocabulary

    Vocabulary.from_names(list(COLOURS), unseen={"yellow"}).write_csv(tmp_path / "classes.csv")
    make_shards(tmp_path / "shards" / "train")  # 4 shards x 6 images
    args = ["train", "--shards", str(tmp_path / "shards" / "train"), "--classes", str(tmp_path / "classes.csv"),
            "--out", str(tmp_path / "run"), "--backbone", "dart-tiny-vit", "--pretrained", tiny_clip_ckpt,
            "--epochs", "2", "--batch-size", "4", "--top-k-share", "0.25", "--val-share", "0.25",
            "--checkpoint-every", "3"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "text-similarity CRG" in r.output
    hist = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    steps = [h for h in hist if "loss" in h or "total" in h]
    epochs = [h for h in hist if "val_seen_mAP" in h]
    # ~6 of the 24 samples held out for validation (4 shards x 6 x 0.25): 18 / batch 4 = 4 steps an epoch
    assert [h["step"] for h in steps] == list(range(1, 9))
    assert [h["epoch"] for h in epochs] == [0, 1, 2]  # the untrained model, then every epoch
    assert {"grad_rank_atm", "grad_rank_class_atm", "grad_wps_arm", "delta_rel"} <= set(steps[0])
    doc = read_checkpoint(tmp_path / "run" / "model.pt")
    assert doc["vocab"]["names"] == ["red", "green", "blue"]  # trained on the seen classes only
    best = max(epochs, key=lambda h: (h["val_seen_mAP"], -h["epoch"]))
    assert doc["best_val"]["epoch"] == best["epoch"]  # model.pt is the best validation epoch
    assert read_checkpoint(tmp_path / "run" / "last.pt")["train_config"]["checkpoint_every"] == 3
    # a second call finds last.pt at the final step: nothing more to train, same checkpoint
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == len(hist)


def test_dart_train_bad_vocabulary_is_one_line(tmp_path, tiny_clip_ckpt):
    (tmp_path / "classes.csv").write_text("id,name,split\na,cat,seen\nb,cat,seen\n")
    r = CliRunner().invoke(app, ["train", "--shards", str(tmp_path), "--classes", str(tmp_path / "classes.csv"),
                                 "--out", str(tmp_path / "run"), "--backbone", "dart-tiny-vit",
                                 "--pretrained", tiny_clip_ckpt])
    assert r.exit_code == 2
    assert "error:" in r.output and "duplicate class name 'cat'" in r.output


def test_dart_info_counts(tiny_clip_ckpt):
    from dart_core.model import DART, DARTConfig

    r = CliRunner().invoke(app, ["info", "--backbone", "dart-tiny-vit"])
    assert r.exit_code == 0, r.output
    c = DART(DARTConfig(backbone="dart-tiny-vit", pretrained=None)).parameter_counts()
    assert f"trainable: {c['trainable'] / 1e6:.2f}M" in r.output
    assert f"vision tower + trainable (the paper's Tab. 7 'Param' counting): {(c['vision_tower'] + c['trainable']) / 1e6:.1f}M" in r.output


def test_training_is_reproducible_whatever_ran_before(tmp_path, tiny_clip_ckpt):
    import torch

    from dart_core.checkpoint import read_checkpoint
    from dart_core.model import DARTConfig
    from dart_core.train import TrainConfig, train_on_shards
    from dart_core.vocab import Vocabulary

    vocab = Vocabulary.from_names(list(COLOURS), unseen={"yellow"})
    make_shards(tmp_path / "shards")
    cfg = DARTConfig(backbone="dart-tiny-vit", pretrained=tiny_clip_ckpt, top_k_share=0.25)
    states = []
    for run, noise in (("a", 0), ("b", 7)):
        torch.rand(noise)  # other work in the same process draws from the global RNG first
        ckpt = train_on_shards(str(tmp_path / "shards"), vocab, tmp_path / run, cfg,
                               TrainConfig(epochs=1, batch_size=4, log_every=100), n_samples=24,
                               crg_source="similarity", log=lambda m: None)
        states.append(read_checkpoint(ckpt)["state_dict"])
    assert states[0].keys() == states[1].keys() and len(states[0]) > 10
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_train_refuses_a_random_backbone(tmp_path):
    import pytest

    from dart_core.model import DARTConfig
    from dart_core.train import RANDOM_BACKBONE_REFUSED, TrainConfig, train_on_shards
    from dart_core.vocab import Vocabulary

    Vocabulary.from_names(list(COLOURS), unseen={"yellow"}).write_csv(tmp_path / "classes.csv")
    make_shards(tmp_path / "shards", n_shards=1)
    r = CliRunner().invoke(app, ["train", "--shards", str(tmp_path / "shards"), "--classes", str(tmp_path / "classes.csv"),
                                 "--out", str(tmp_path / "run"), "--backbone", "dart-tiny-vit", "--pretrained", "none"])
    assert r.exit_code == 2 and r.output == f"error: {RANDOM_BACKBONE_REFUSED}\n"
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--pretrained none: a random backbone is not saved"):
        train_on_shards(str(tmp_path / "shards"), Vocabulary.read_csv(tmp_path / "classes.csv"), tmp_path / "run",
                        DARTConfig(backbone="dart-tiny-vit", pretrained=None), TrainConfig(), n_samples=6)
