"""Model-zoo classifier imports: the head's output activation is never guessed (ST-MEM needs ``multilabel=`` /
``--multiclass``; ECGFounder's sigmoid comes from its code), heads of the wrong shape are refused at conversion with
the key named (also on the command line, as its one-line error), the written classifier is reloaded and run before
it is published, its model card carries the peer's licence and citation, and publishing holds the artifact lock."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from ecgfm.zoo import ZooImportError, import_classifier, import_encoder
from ecgfm.zoo.__main__ import main as zoo_main
from tests.unit.test_zoo import PEERS

STMEM_WIDTH = 64           # the fixture's ST-MEM width (stmem_vit_tiny_args.json)
ECGF_WIDTH, ECGF_CLASSES = 48, 5   # the fixture's Net1D embedding width and dense outputs


@pytest.fixture(scope="module")
def peers():
    if not PEERS.is_dir():
        pytest.skip(f"peer fixtures not found at {PEERS} (expected ../shared/fixtures/peers beside the project root)")
    return PEERS


def _stmem_with_head(peers, path, weight, bias=None):
    """The ST-MEM fixture as a fine-tuned checkpoint: its encoder plus ``head.*``."""
    state = dict(torch.load(peers / "stmem_vit_tiny.pth", weights_only=True)["model"])
    state["head.weight"] = weight
    if bias is not None:
        state["head.bias"] = bias
    torch.save({"model": state}, path)
    return path


def _ecgfounder_with(peers, path, **replace):
    state = dict(torch.load(peers / "ecgfounder_net1d_tiny.pth", weights_only=True)["state_dict"])
    state.update({k.replace("__", "."): v for k, v in replace.items()})
    torch.save({"state_dict": state}, path)
    return path


def _good_stmem(peers, tmp_path):
    g = torch.Generator().manual_seed(0)
    return _stmem_with_head(peers, tmp_path / "stmem_ft.pth", torch.randn(3, STMEM_WIDTH, generator=g),
                            torch.randn(3, generator=g))


def _nothing_left(tmp_path, out_name):
    assert not (tmp_path / out_name).exists()
    # no staging folder (the .<name>.lock file every artifact writer takes for the folder may stay)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out_name}.") and p.suffix != ".lock"]


# ------------------------------------------------------------------ 1. the output activation is not guessed
def test_stmem_classifier_needs_the_activation_and_softmax_rows_sum_to_one(peers, tmp_path):
    ckpt = _good_stmem(peers, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ZooImportError, match=r"stmem: the output activation .* not stored in the weights.*"
                                                 r"multilabel=False \(--multiclass\).*multilabel=True "
                                                 r"\(--multilabel\)"):
            import_classifier("stmem", ckpt, tmp_path / "clf", num_heads=4)
        _nothing_left(tmp_path, "clf")
        with pytest.raises(ZooImportError, match="multilabel must be True .* or False .*, got str 'false'"):
            import_classifier("stmem", ckpt, tmp_path / "clf", num_heads=4, multilabel="false")

        out = import_classifier("stmem", ckpt, tmp_path / "clf", num_heads=4, multilabel=False)
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["multilabel"] is False
    head = meta["extra"]["zoo"]["head"]
    assert head["num_classes"] == 3 and head["activation"] == "softmax" and head["multilabel"] is False
    assert "option multilabel" in head["activation_from"]

    from ecgfm.api import Classifier

    x = np.random.default_rng(0).standard_normal((12, 2250)).astype(np.float32)
    p = Classifier.load(out).predict_proba(x, fs=250).to_numpy()
    assert p.shape[-1] == 3 and np.allclose(p.sum(axis=-1), 1.0, atol=1e-5)


def test_ecgfounder_classifier_stays_sigmoid_by_default_from_its_code(peers, tmp_path):
    out = import_classifier("ecgfounder", peers / "ecgfounder_net1d_tiny.pth", tmp_path / "clf")
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["multilabel"] is True
    head = meta["extra"]["zoo"]["head"]
    assert head["activation"] == "sigmoid" and "BCEWithLogitsLoss" in head["activation_from"]
    # the caller may still say otherwise (a re-fine-tuned head), and that is recorded as such
    out2 = import_classifier("ecgfounder", peers / "ecgfounder_net1d_tiny.pth", tmp_path / "clf2", multilabel=False)
    meta2 = json.loads((out2 / "classifier.json").read_text())
    assert meta2["multilabel"] is False and meta2["extra"]["zoo"]["head"]["activation"] == "softmax"


def test_cli_activation_flags(peers, tmp_path, capsys):
    ckpt = _good_stmem(peers, tmp_path)
    base = ["stmem", str(ckpt), str(tmp_path / "clf"), "--classifier", "--num-heads", "4"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert zoo_main(base) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: stmem: the output activation") and "--multiclass" in err
        assert len(err.strip().splitlines()) == 1
        _nothing_left(tmp_path, "clf")
        with pytest.raises(SystemExit):   # one or the other
            zoo_main(base + ["--multilabel", "--multiclass"])
        capsys.readouterr()
        assert zoo_main(["stmem", str(ckpt), str(tmp_path / "enc"), "--num-heads", "4", "--multiclass"]) == 2
        assert "applies to a classifier import only" in capsys.readouterr().err
        assert zoo_main(base + ["--multiclass"]) == 0
        assert json.loads((tmp_path / "clf" / "classifier.json").read_text())["multilabel"] is False
        assert zoo_main(base + ["--multilabel", "--overwrite"]) == 0
        assert json.loads((tmp_path / "clf" / "classifier.json").read_text())["multilabel"] is True


# ------------------------------------------------------------------ 2./3. head shapes checked at conversion
@pytest.mark.parametrize("weight,bias,match", [
    ((3, 32), (3,), r"'head\.weight' has shape \(3, 32\), expected \(num_classes, 64\)"),
    ((64,), (64,), r"'head\.weight' has shape \(64,\), expected \(num_classes, 64\)"),
    ((3, 64, 1), (3,), r"'head\.weight' has shape \(3, 64, 1\), expected \(num_classes, 64\)"),
    ((3, 64), (5,), r"'head\.bias' has shape \(5,\), expected \(3,\)"),
    ((3, 64), (3, 1), r"'head\.bias' has shape \(3, 1\), expected \(3,\)"),
])
def test_stmem_head_of_the_wrong_shape_is_refused_naming_the_key(peers, tmp_path, capsys, weight, bias, match):
    ckpt = _stmem_with_head(peers, tmp_path / "bad.pth", torch.zeros(weight), torch.zeros(bias))
    with pytest.raises(ZooImportError, match=match):
        import_classifier("stmem", ckpt, tmp_path / "clf", num_heads=4, multilabel=False)
    _nothing_left(tmp_path, "clf")
    # the command line ends in its one-line error, not a traceback
    assert zoo_main(["stmem", str(ckpt), str(tmp_path / "clf"), "--classifier", "--num-heads", "4",
                     "--multiclass"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: stmem: 'head.") and len(err.splitlines()) == 1
    _nothing_left(tmp_path, "clf")


@pytest.mark.parametrize("replace,match", [
    ({"dense__bias": torch.zeros(7)}, r"'dense\.bias' has shape \(7,\), expected \(5,\)"),
    ({"dense__weight": torch.zeros(ECGF_CLASSES, ECGF_WIDTH + 1)},
     r"'dense\.weight' has shape \(5, 49\), expected \(num_classes, 48\)"),
    ({"dense__weight": torch.zeros(ECGF_WIDTH)}, r"'dense\.weight' has shape \(48,\), expected \(num_classes, 48\)"),
])
def test_ecgfounder_dense_of_the_wrong_shape_is_refused_naming_the_key(peers, tmp_path, capsys, replace, match):
    ckpt = _ecgfounder_with(peers, tmp_path / "bad.pth", **replace)
    with pytest.raises(ZooImportError, match=match):
        import_classifier("ecgfounder", ckpt, tmp_path / "clf")
    assert zoo_main(["ecgfounder", str(ckpt), str(tmp_path / "clf"), "--classifier"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ecgfounder: 'dense.") and len(err.splitlines()) == 1
    _nothing_left(tmp_path, "clf")


def test_stmem_head_bias_without_weight_is_named(peers, tmp_path):
    state = dict(torch.load(peers / "stmem_vit_tiny.pth", weights_only=True)["model"])
    state["head.bias"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "b.pth")
    with pytest.raises(ZooImportError, match=r"'head\.bias' .* present but 'head\.weight' is missing"):
        import_classifier("stmem", tmp_path / "b.pth", tmp_path / "clf", num_heads=4, multilabel=False)


# ------------------------------------------------------------------ 2. the written classifier is reloaded and run
def test_written_classifier_is_reloaded_and_checked_before_publishing(peers, tmp_path, monkeypatch):
    """A classifier written with other head weights than the imported ones (any fault between the model in memory
    and the files) is caught by the reload check, and nothing is published."""
    import ecgfm.explain.classifier as explain_classifier

    original = explain_classifier.save_classifier

    def corrupting(out_dir, backbone, head, *args, **kwargs):
        bad = torch.nn.Linear(head.in_features, head.out_features)
        with torch.no_grad():
            bad.weight.copy_(head.weight * 1.5)
            bad.bias.copy_(head.bias)
        return original(out_dir, backbone, bad, *args, **kwargs)

    monkeypatch.setattr(explain_classifier, "save_classifier", corrupting)
    with pytest.raises(ZooImportError, match="does not reproduce the imported model's logits"):
        import_classifier("ecgfounder", peers / "ecgfounder_net1d_tiny.pth", tmp_path / "clf")
    _nothing_left(tmp_path, "clf")


# ------------------------------------------------------------------ 4. licence and citation on the classifier card
def test_classifier_card_states_the_peer_licence_and_citation(peers, tmp_path):
    ckpt = _good_stmem(peers, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = import_classifier("stmem", ckpt, tmp_path / "clf", num_heads=4, multilabel=False)
        enc = import_encoder("stmem", ckpt, tmp_path / "enc", num_heads=4)
    card = (out / "README.md").read_text()
    assert "licence: CC BY-NC 4.0" in card and "Na, Y., Park, M." in card
    assert str(out) in card   # retitled after the rename, as the encoder's card
    prov = json.loads((out / "classifier.json").read_text())["provenance"]
    assert prov["licence"].startswith("CC BY-NC 4.0") and prov["source_checkpoint"]["file"] == "stmem_ft.pth"
    # the same licence line as the encoder imported from the same checkpoint
    enc_licence = [ln for ln in (enc / "README.md").read_text().splitlines() if ln.startswith("- licence:")]
    assert enc_licence and enc_licence[0] in card.splitlines()

    ef = import_classifier("ecgfounder", peers / "ecgfounder_net1d_tiny.pth", tmp_path / "ef")
    assert "licence: MIT" in (ef / "README.md").read_text()


# ------------------------------------------------------------------ 5. publishing holds the artifact lock
def test_publish_holds_the_artifact_folder_lock(peers, tmp_path, monkeypatch):
    """The zoo's publish step takes the lock file ecgfm.artifacts.write_artifact takes for the same folder
    (``.<name>.lock`` beside it), so a concurrent writer of that folder waits instead of being overwritten."""
    import ecgfm.export as export
    from ecgfm.io import LockBusy, file_lock

    original = export.export_encoder
    seen = []

    def probing(backbone, folder, *args, **kwargs):
        try:
            with file_lock(tmp_path / ".enc.lock", blocking=False):
                seen.append("free")
        except LockBusy:
            seen.append("held")
        return original(backbone, folder, *args, **kwargs)

    monkeypatch.setattr(export, "export_encoder", probing)
    import_encoder("ecgfounder", peers / "ecgfounder_net1d_tiny.pth", tmp_path / "enc")
    assert seen == ["held"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".enc.lock", "enc"]
    import_encoder("ecgfounder", peers / "ecgfounder_net1d_tiny.pth", tmp_path / "enc", overwrite=True)
    assert seen == ["held", "held"]


def test_folder_lock_is_held_by_one_writer_at_a_time(tmp_path):
    """Four writers of one folder: never two inside the lock at once."""
    import threading
    import time

    from ecgfm.zoo.importer import _folder_lock

    out = tmp_path / "enc"
    inside, overlaps, errors = [0], [], []

    def worker():
        try:
            for _ in range(20):
                with _folder_lock(out):
                    inside[0] += 1
                    if inside[0] != 1:
                        overlaps.append(inside[0])
                    time.sleep(0.0005)
                    inside[0] -= 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a writer is still waiting for the lock after 60 s"
    assert not errors and not overlaps
