"""Model-zoo review fixes: ST-MEM's ``leads`` channel order, the assumed number of heads, ``leads`` given as a string
or with a lead twice, HuBERT-ECG's own checkpoint keys, HuBERT's single-convolution feature encoder, and the API's
warning for records shorter than the window."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from ecgfm.api import Classifier, Encoder
from ecgfm.backbones import create_backbone
from ecgfm.data.record import CANONICAL_LEADS
from ecgfm.export import load_encoder
from ecgfm.zoo import ZooImportError, import_classifier, import_encoder, load_peer
from ecgfm.zoo import ecgfounder as zoo_ecgfounder
from ecgfm.zoo import hubert_ecg as zoo_hubert
from ecgfm.zoo import stmem as zoo_stmem
from ecgfm.zoo.__main__ import main as zoo_main
from tests.unit.test_zoo import NET1D_SIZES, PEERS, STMEM_SIZES, _perturb, assert_matches, stmem_reference

# HEEDB / MIMIC-IV-ECG store aVF before aVL
HEEDB_ORDER = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]


@pytest.fixture(scope="module")
def peers():
    if not PEERS.is_dir():
        pytest.skip(f"peer fixtures not found at {PEERS} (expected ../shared/fixtures/peers beside the project root)")
    return PEERS


def _stmem_checkpoint(tmp_path, size=STMEM_SIZES[0], seed=1):
    native = _perturb(create_backbone("stmem_vit", **size), seed)
    path = tmp_path / "stmem.pth"
    torch.save({"model": zoo_stmem.to_peer(native.state_dict())}, path)
    return native, path


def _hubert_native(seed=0, **kw):
    size = dict(conv_dim=[16, 24], conv_kernel=[10, 3], conv_stride=[5, 2], hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=48, num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4)
    size.update(kw)
    return _perturb(create_backbone("hubert_ecg", **size), seed)


def _save_safetensors(state, path):
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))
    return path


# ------------------------------------------------------------------ 1. ST-MEM: leads= naming all 12 in another order
def test_stmem_full_lead_order_reproduces_the_peer_on_that_channel_order(peers, tmp_path):
    """The peer adds lead_embeddings.i to input channel i. A checkpoint trained on HEEDB's channel order, imported
    with checkpoint_leads=that order, must give on a canonical record what the peer gives on the record in that
    order: the fixture's input is the peer's channels, so the canonical record is its rows put back in canonical
    order. leads= that order alone is refused (it used to be ignored: 0.013 off the peer); any reading order (or
    none) then gives the same embedding, each lead with the embedding it was trained with."""
    from safetensors.torch import load_file

    io = load_file(str(peers / "stmem_vit_tiny_io.safetensors"))
    x_peer = io["input"]                                          # channel i = lead HEEDB_ORDER[i]
    x_canon = torch.empty_like(x_peer)
    x_canon[:, [CANONICAL_LEADS.index(lead) for lead in HEEDB_ORDER]] = x_peer
    with pytest.raises(ZooImportError, match="checkpoint_leads"):
        import_encoder("stmem", peers / "stmem_vit_tiny.pth", tmp_path / "bad", num_heads=4, leads=HEEDB_ORDER)
    for k, leads in enumerate((HEEDB_ORDER, None)):
        out = import_encoder("stmem", peers / "stmem_vit_tiny.pth", tmp_path / f"enc{k}", num_heads=4,
                             leads=leads, checkpoint_leads=HEEDB_ORDER)
        loaded, _, info = load_encoder(out)
        with torch.no_grad():
            assert_matches(loaded.embed(x_canon), io["embedding"])
        zoo = info["extra"]["zoo"]
        assert info["init_args"]["input_leads"] == leads
        assert "put into the canonical order" in zoo["inferred"]["lead_embed"]


def test_stmem_random_channel_order_matches_the_reference_and_canonical_order_is_unchanged(tmp_path):
    size = STMEM_SIZES[0]
    native, path = _stmem_checkpoint(tmp_path, size)
    peer = zoo_stmem.to_peer(native.state_dict())
    order = [CANONICAL_LEADS[i] for i in torch.randperm(12, generator=torch.Generator().manual_seed(3)).tolist()]
    bb, w = load_peer("stmem", path, num_heads=size["heads"], checkpoint_leads=order)
    x = torch.randn(2, 12, size["seq_len"])
    with torch.no_grad():
        expected = stmem_reference(peer, x[:, [CANONICAL_LEADS.index(lead) for lead in order]], size["heads"])
        assert_matches(bb.embed(x), expected)
        # a subset read from that checkpoint: each lead with the embedding the checkpoint trained it with
        sub, _ = load_peer("stmem", path, num_heads=size["heads"], leads=["aVF", "II"], checkpoint_leads=order)
        for lead in ("aVF", "II"):
            assert torch.equal(sub.lead_embed[CANONICAL_LEADS.index(lead)], peer[f"lead_embeddings.{order.index(lead)}"])
        # the canonical order spelled out is the default: no permutation
        canon, w2 = load_peer("stmem", path, num_heads=size["heads"], leads=list(CANONICAL_LEADS),
                              checkpoint_leads=list(CANONICAL_LEADS))
        assert torch.equal(canon.embed(x), native.embed(x)) and "lead_embed" not in w2.inferred


# ------------------------------------------------------------------ 3. ST-MEM: the published heads are an assumption
def test_stmem_published_heads_are_assumed_warned_and_recorded(tmp_path):
    """A ViT-S-shaped checkpoint (width 384, 12 blocks) trained with 12 heads of 32: without num_heads it is given the
    published 6 heads of 64, which must be said (warning) and recorded as assumed in the artifact."""
    size = dict(seq_len=150, patch_size=75, width=384, depth=12, heads=12, dim_head=32, mlp_dim=16)
    native, path = _stmem_checkpoint(tmp_path, size)
    with pytest.warns(UserWarning, match=r"heads assumed: the published ST-MEM ViT-S configuration .*num_heads="):
        out = import_encoder("stmem", path, tmp_path / "enc")
    zoo = json.loads((out / "encoder.json").read_text())["extra"]["zoo"]
    assert set(zoo["assumed"]) == {"heads"} and zoo["assumed"]["heads"].startswith("assumed:")
    assert zoo["inferred"]["heads"] == zoo["assumed"]["heads"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # given: nothing assumed, no warning
        bb, w = load_peer("stmem", path, num_heads=12)
    assert w.assumed == {} and w.init_args["dim_head"] == 32
    x = torch.randn(1, 12, 150)
    with torch.no_grad():
        assert torch.equal(bb.embed(x), native.embed(x))


# ------------------------------------------------------------------ 4. leads= as a string, or naming a lead twice
def test_leads_string_or_duplicates_are_refused(tmp_path):
    size = STMEM_SIZES[0]
    _, path = _stmem_checkpoint(tmp_path, size)
    with pytest.raises(ValueError, match=r"stmem: option leads must be a list .*got str 'II' \(a string is not split"):
        load_peer("stmem", path, num_heads=size["heads"], leads="II")
    with pytest.raises(ValueError, match=r"stmem: option leads names lead\(s\) \['II'\] more than once"):
        load_peer("stmem", path, num_heads=size["heads"], leads=["II", "V1", "II"])
    with pytest.raises(ValueError, match=r"not canonical: \['V7'\]"):
        load_peer("stmem", path, num_heads=size["heads"], leads=["II", "V7"])
    bb, _ = load_peer("stmem", path, num_heads=size["heads"], leads=("II", "V1"))   # a tuple is a sequence
    assert bb.embed(torch.randn(1, 12, size["seq_len"])).shape == (1, size["width"])

    one = _perturb(create_backbone("net1d", **NET1D_SIZES[2], input_leads=["I"]), 2)
    torch.save({"state_dict": zoo_ecgfounder.to_peer(one.state_dict())}, tmp_path / "n1.pth")
    with pytest.raises(ValueError, match=r"ecgfounder: option leads must be a list .*got str 'I'"):
        load_peer("ecgfounder", tmp_path / "n1.pth", leads="I")      # was read as ['I'] by chance
    twelve = _perturb(create_backbone("net1d", **NET1D_SIZES[0]), 2)
    torch.save({"state_dict": zoo_ecgfounder.to_peer(twelve.state_dict())}, tmp_path / "n12.pth")
    with pytest.raises(ValueError, match=r"ecgfounder: option leads names lead\(s\) \['aVL'\] more than once"):
        load_peer("ecgfounder", tmp_path / "n12.pth", leads=[*CANONICAL_LEADS[:5], "aVL", *CANONICAL_LEADS[6:]])
    # the backbones refuse them as well
    with pytest.raises(ValueError, match="a string is not split"):
        create_backbone("net1d", **NET1D_SIZES[2], input_leads="I")
    with pytest.raises(ValueError, match="more than once"):
        create_backbone("stmem_vit", **size, input_leads=["II", "II"])
    # and the command line says so
    assert zoo_main(["stmem", str(path), str(tmp_path / "cli"), "--num-heads", str(size["heads"]),
                     "--leads", "II,II"]) == 1
    assert not (tmp_path / "cli").exists()


# ------------------------------------------------------------------ 5. HuBERT-ECG's own class: label_embedding.{i}
@pytest.mark.parametrize("name", ["label_embedding", "label_embeddings"])
def test_hubertecg_pretraining_keys_are_ignored(name, tmp_path, capsys):
    """HuBERT-ECG's HuBERTECG(HubertModel) stores final_proj.{i} and label_embedding.{i} (singular; Hugging Face's
    pretraining heads say label_embeddings): both import, the extra keys listed as ignored."""
    native = _hubert_native()
    state = zoo_hubert.to_peer(native.state_dict())
    state.update({"masked_spec_embed": torch.zeros(32), "final_proj.0.weight": torch.zeros(16, 32),
                  "final_proj.0.bias": torch.zeros(16), f"{name}.0.weight": torch.zeros(100, 16)})
    path = _save_safetensors(state, tmp_path / "model.safetensors")
    rc = zoo_main(["hubert_ecg", str(path), str(tmp_path / "enc"), "--conv-stride", "5,2", "--num-heads", "4",
                   "--post-norm"])
    assert rc == 0, capsys.readouterr().err
    loaded, _, info = load_encoder(tmp_path / "enc")
    assert info["extra"]["zoo"]["ignored_keys"] == sorted(
        ["masked_spec_embed", "final_proj.0.weight", "final_proj.0.bias", f"{name}.0.weight"])
    x = torch.randn(2, 12, 100)
    with torch.no_grad():
        assert torch.equal(loaded.embed(x), native.embed(x))


# ------------------------------------------------------------------ 6. HuBERT: one convolution, GroupNorm or LayerNorm?
def test_hubert_single_convolution_needs_feat_extract_norm(tmp_path):
    """With one feature-encoder convolution, GroupNorm(C, C) and LayerNorm(C) leave weights of the same shapes: an
    import without config.json must ask, not default to 'group'."""
    native = _hubert_native(conv_dim=[16], conv_kernel=[10], conv_stride=[5], feat_extract_norm="layer",
                            num_hidden_layers=1)
    path = _save_safetensors(zoo_hubert.to_peer(native.state_dict()), tmp_path / "model.safetensors")
    opts = dict(conv_stride=[5], num_heads=4, stable_layer_norm=False)
    with pytest.raises(ZooImportError, match=r"hubert_ecg: feat_extract_norm cannot be read .*--feat-extract-norm"):
        load_peer("hubert_ecg", path, **opts)
    bb, w = load_peer("hubert_ecg", path, feat_extract_norm="layer", **opts)
    assert w.init_args["feat_extract_norm"] == "layer" and w.inferred["feat_extract_norm"] == "option feat_extract_norm"
    x = torch.randn(2, 12, 100)
    with torch.no_grad():
        assert torch.equal(bb.embed(x), native.embed(x))
    with pytest.raises(ZooImportError, match="must be 'group' or 'layer'"):
        load_peer("hubert_ecg", path, feat_extract_norm="batch", **opts)
    # config.json beside the checkpoint says it
    (tmp_path / "config.json").write_text(json.dumps({"feat_extract_norm": "layer", "conv_stride": [5],
                                                      "num_attention_heads": 4, "do_stable_layer_norm": False}))
    bb2, w2 = load_peer("hubert_ecg", path)
    assert w2.inferred["feat_extract_norm"] == "config.json"
    with torch.no_grad():
        assert torch.equal(bb2.embed(x), native.embed(x))
    # the command line has the option
    (tmp_path / "config.json").unlink()
    assert zoo_main(["hubert_ecg", str(path), str(tmp_path / "enc"), "--conv-stride", "5", "--num-heads", "4",
                     "--post-norm", "--feat-extract-norm", "layer"]) == 0


def test_hubert_feat_extract_norm_contradicting_the_weights_is_refused(tmp_path):
    native = _hubert_native()        # two convolutions, GroupNorm in the first only: the weights say 'group'
    path = _save_safetensors(zoo_hubert.to_peer(native.state_dict()), tmp_path / "model.safetensors")
    opts = dict(conv_stride=[5, 2], num_heads=4, stable_layer_norm=False)
    with pytest.raises(ZooImportError, match=r"option feat_extract_norm says feat_extract_norm='layer' but .*'group'"):
        load_peer("hubert_ecg", path, feat_extract_norm="layer", **opts)
    _, w = load_peer("hubert_ecg", path, feat_extract_norm="group", **opts)
    assert w.init_args["feat_extract_norm"] == "group"


# ------------------------------------------------------------------ 2. the API: records shorter than the window
def test_encoder_warns_when_a_record_is_shorter_than_the_window(tmp_path):
    size = STMEM_SIZES[0]                             # window 500 samples at 250 Hz (2 s)
    _, path = _stmem_checkpoint(tmp_path, size)
    enc = Encoder.load(import_encoder("stmem", path, tmp_path / "enc", num_heads=size["heads"]))
    rng = np.random.default_rng(0)
    short = rng.standard_normal((12, 300)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"record 0: 300 samples \(1\.2 s at 250 Hz\) after preprocessing, shorter "
                                         r"than the model's window of 500 samples \(2 s at 250 Hz\): zero-padded.* "
                                         r"40% of the window"):
        z = enc.embed(short, fs=250)
    assert z.shape == (size["width"],)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # one window or more: no warning
        enc.embed(rng.standard_normal((12, 500)).astype(np.float32), fs=250)
        enc.embed(rng.standard_normal((12, 777)).astype(np.float32), fs=250)


def test_classifier_warns_when_a_record_is_shorter_than_the_window(tmp_path):
    size = NET1D_SIZES[0]                             # ECGFounder: 10 s windows at 500 Hz
    native = _perturb(create_backbone("net1d", **size), 2)
    peer = zoo_ecgfounder.to_peer(native.state_dict())
    peer.update({"dense.weight": torch.randn(3, size["filter_list"][-1]), "dense.bias": torch.randn(3)})
    torch.save({"state_dict": peer}, tmp_path / "peer.pth")
    clf = Classifier.load(import_classifier("ecgfounder", tmp_path / "peer.pth", tmp_path / "clf"))
    x = np.random.default_rng(1).standard_normal((2, 12, 4000)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = clf.predict_proba(x, fs=500)
    assert p.shape == (2, 3)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for i in range(2):   # every record of the batch is named
        assert any(m.startswith(f"record {i}: 4000 samples (8 s at 500 Hz)") and "window of 5000 samples" in m
                   and "20% of the window" in m for m in messages), messages
