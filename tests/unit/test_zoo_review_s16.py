"""Model-zoo review (s16): imported models record the peer's trained leads (so the API derives III / aVR / aVL / aVF
from I and II and warns about absent leads, as for a sweep's classifier), errors raised while converting a file name
that file, and the model card of an imported model names its source checkpoint (sha256) and the peer's code and
weights URLs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ecgfm.api import Classifier, Encoder
from ecgfm.artifacts import model_card, read_meta
from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.export import load_encoder
from ecgfm.zoo import ZooImportError, import_classifier, import_encoder, load_peer
from ecgfm.zoo.__main__ import main as zoo_main
from tests.unit.test_zoo import PEERS

LIMB = ("III", "aVR", "aVL", "aVF")


@pytest.fixture(scope="module")
def peers():
    if not PEERS.is_dir():
        pytest.skip(f"peer fixtures not found at {PEERS} (expected ../shared/fixtures/peers beside the project root)")
    return PEERS


def _twelve_lead_record(n: int = 5000, seed: int = 0) -> np.ndarray:
    """A smooth random 12-lead record whose limb leads obey Einthoven / Goldberger exactly (III = II - I, ...), as
    a cart's do, so that leads derived from I and II are the record's own."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((12, n)).cumsum(1) * 0.01).astype(np.float64)
    lead_i, lead_ii = x[0], x[1]
    x[2], x[3], x[4], x[5] = lead_ii - lead_i, -(lead_i + lead_ii) / 2, lead_i - lead_ii / 2, lead_ii - lead_i / 2
    return x.astype(np.float32)


# ------------------------------------------------------------------ 1. trained_leads
def test_imported_models_record_the_peers_leads_as_a_sweep_does(peers, tmp_path):
    clf = import_classifier("ecgfounder", peers / "ecgfounder_net1d_tiny.pth", tmp_path / "clf")
    _, meta = read_meta(clf)
    assert meta["extra"]["trained_leads"] == list(CANONICAL_LEADS)
    assert meta["extra"]["derive_limb_leads"] is True   # trained on records holding every lead it reads
    enc = import_encoder("stmem", peers / "stmem_vit_tiny.pth", tmp_path / "enc", num_heads=4)
    assert load_encoder(enc)[2]["extra"]["trained_leads"] == list(CANONICAL_LEADS)
    # a subset read in another order: the leads it reads, in the canonical order (the sweep's format)
    sub = import_encoder("stmem", peers / "stmem_vit_tiny.pth", tmp_path / "sub", num_heads=4, leads=["V1", "II"])
    assert load_encoder(sub)[2]["extra"]["trained_leads"] == ["II", "V1"]


def test_eight_lead_record_gets_its_limb_leads_derived_and_a_missing_lead_is_warned(peers, tmp_path, caplog):
    """ECGFounder reads 12 leads: an 8-lead record (I, II, V1-V6, as many carts store) must score as the 12-lead
    record (III, aVR, aVL, aVF derived from I and II), not with four zero rows, and lead II alone must be warned
    about (it was scored with eleven zero rows without a word)."""
    out = import_classifier("ecgfounder", peers / "ecgfounder_net1d_tiny.pth", tmp_path / "clf")
    clf = Classifier.load(out)
    x = _twelve_lead_record()
    p12 = clf.predict_proba(x, fs=500).to_numpy()[0]
    keep = [i for i, lead in enumerate(CANONICAL_LEADS) if lead not in LIMB]
    with caplog.at_level(logging.WARNING, logger="ecgfm"):
        p8 = clf.predict_proba(x[keep], fs=500, leads=[CANONICAL_LEADS[i] for i in keep]).to_numpy()[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    np.testing.assert_allclose(p8, p12, rtol=0, atol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ecgfm"):
        clf.predict_proba(x[[1]], fs=500, leads=["II"])
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "absent from this record" in text and "V6" in text, text
    # the encoder prepares records the same way
    enc = Encoder.load(import_encoder("ecgfounder", peers / "ecgfounder_net1d_tiny.pth", tmp_path / "enc"))
    np.testing.assert_allclose(enc.embed(x[keep], fs=500, leads=[CANONICAL_LEADS[i] for i in keep]),
                               enc.embed(x, fs=500), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ 3. errors name the file
def _broken(peers, tmp_path):
    """Checkpoints whose keys / shapes do not fit, each with the key / shape message the converter raises."""
    st = torch.load(peers / "stmem_vit_tiny.pth", weights_only=True)["model"]
    ef = torch.load(peers / "ecgfounder_net1d_tiny.pth", weights_only=True)["state_dict"]
    cases = []
    s = dict(st)
    del s["block1.ff.norm.weight"]
    cases.append(("stmem", "st_missing.pth", {"model": s}, "missing keys"))
    s = {**st, "foo.bar": torch.zeros(3)}
    cases.append(("stmem", "st_unexpected.pth", {"model": s}, "unexpected keys"))
    s = {**st, "block1.ff.fn.net.3.weight": torch.zeros(64, 127)}
    cases.append(("stmem", "st_shape.pth", {"model": s}, "shape mismatches"))
    e = {**ef, "stage_list.2.block_list.1.conv2.conv.bias": torch.zeros(7)}
    cases.append(("ecgfounder", "ef_shape.pth", {"state_dict": e}, "shape mismatches"))
    e = dict(ef)
    del e["stage_list.2.block_list.1.se_fc1.weight"]
    cases.append(("ecgfounder", "ef_missing.pth", {"state_dict": e}, "missing keys"))
    out = []
    for kind, name, obj, what in cases:
        torch.save(obj, tmp_path / name)
        out.append((kind, tmp_path / name, what))
    return out


def test_key_shape_and_option_errors_name_the_checkpoint(peers, tmp_path, capsys):
    for kind, path, what in _broken(peers, tmp_path):
        opts = {"num_heads": 4} if kind == "stmem" else {}
        with pytest.raises(ZooImportError) as info:
            load_peer(kind, path, **opts)
        msg = str(info.value)
        assert msg.startswith(f"{kind}: the state dict does not fit") and what in msg, msg
        assert msg.endswith(f" (checkpoint {path})"), msg
        assert isinstance(info.value.__cause__, ZooImportError)   # the converter's own error, kept as the cause
        with pytest.raises(ZooImportError, match=str(path).replace(".", r"\.")):
            import_encoder(kind, path, tmp_path / "out", **opts)
        assert not (tmp_path / "out").exists()
    # an option that contradicts the weights
    with pytest.raises(ZooImportError, match=r"^stmem: num_heads=3 does not divide .*\(checkpoint .*stmem_vit_tiny"
                                             r"\.pth\)$"):
        load_peer("stmem", peers / "stmem_vit_tiny.pth", num_heads=3)
    # and the command line's one error line
    kind, path, _ = _broken(peers, tmp_path)[0]
    assert zoo_main([kind, str(path), str(tmp_path / "cli"), "--num-heads", "4"]) != 0
    err = capsys.readouterr().err
    assert "the state dict does not fit" in err and f"(checkpoint {path})" in err, err


# ------------------------------------------------------------------ 4. model card names the source
def test_model_card_of_an_imported_model_names_checkpoint_sha256_code_and_weights(peers, tmp_path):
    for kind, importer, opts in (("ecgfounder", import_classifier, {}), ("stmem", import_encoder, {"num_heads": 4})):
        src = peers / ("ecgfounder_net1d_tiny.pth" if kind == "ecgfounder" else "stmem_vit_tiny.pth")
        out = importer(kind, src, tmp_path / kind, **opts)
        _, meta = read_meta(out)
        prov = meta["provenance"]
        sha = prov["source_checkpoint"]["sha256"]
        for card in ((out / "README.md").read_text(), model_card(meta, str(out))):
            assert f"source checkpoint: {src.name} (sha256 {sha}" in card, card
            assert f"- code: {prov['code']}" in card and f"- weights: {prov['weights']}" in card, card
            assert prov["code"].startswith("https://") and prov["weights"].startswith("https://")
    # a sweep's artifact has none of these: no empty lines for them
    card = model_card({"kind": "classifier", "provenance": {"data": "task x", "seed": 0}}, "clf")
    assert "source checkpoint" not in card and "- code:" not in card and "- weights:" not in card
