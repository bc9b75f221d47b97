"""Registry: ``init_args`` records every constructor argument (size defaults resolved), for any kind of factory."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from torch import nn

from ecgfm.backbones import registry
from ecgfm.backbones.registry import Backbone, create_backbone
from ecgfm.backbones.resnet1d import RESNET_SIZES, XResNet1d
from ecgfm.backbones.vit1d import VIT_SIZES, ViT1D


def _ctor_defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


@pytest.mark.parametrize("name,cls,sizes", [("vit1d_test", ViT1D, VIT_SIZES), ("vit1d_tiny", ViT1D, VIT_SIZES),
                                            ("resnet1d_test", XResNet1d, RESNET_SIZES)])
def test_init_args_are_constructor_defaults_then_size_defaults_then_kwargs(name, cls, sizes):
    given = {"depth": 1} if cls is ViT1D else {"pool": "avg"}
    model = create_backbone(name, **given)
    expected = {**_ctor_defaults(cls), **sizes[name], **given}
    assert model.init_args == expected
    # the recorded arguments alone rebuild the same architecture, also straight through the class
    direct = cls(**model.init_args)
    assert {k: v.shape for k, v in direct.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


def test_init_args_do_not_depend_on_later_registry_defaults(monkeypatch):
    model = create_backbone("vit1d_test")
    monkeypatch.setitem(VIT_SIZES["vit1d_test"], "embed_dim", 32)   # the registry's defaults change later
    assert create_backbone("vit1d_test").num_features == 32         # (the factory does see the change)
    clone = create_backbone("vit1d_test", **model.init_args)
    assert clone.num_features == 16 and clone.init_args == model.init_args


def test_factory_that_transforms_its_arguments_falls_back_to_its_own_signature(monkeypatch):
    def factory(width: int = 8, leads: int = 12):
        # not a pass-through: the recorded constructor call (embed_dim, num_leads, ...) is not what this takes
        return ViT1D(seq_len=50, patch_size=25, num_leads=leads, embed_dim=width, depth=1, num_heads=2)

    monkeypatch.setitem(registry._REGISTRY, "custom_vit", factory)
    model = create_backbone("custom_vit", width=4)
    assert model.init_args == {"width": 4, "leads": 12}
    assert create_backbone("custom_vit", **model.init_args).num_features == 4


def test_plain_module_factories(monkeypatch):
    class Plain(nn.Module):  # not a Backbone: no recorded constructor call
        def __init__(self, d: int) -> None:
            super().__init__()
            self.lin = nn.Linear(12, d)

    monkeypatch.setitem(registry._REGISTRY, "plain_defaults", lambda d=3, bias=True: Plain(d))
    monkeypatch.setitem(registry._REGISTRY, "plain_kwargs", lambda **kw: Plain(**kw))
    assert create_backbone("plain_defaults").init_args == {"d": 3, "bias": True}
    assert create_backbone("plain_kwargs", d=5).init_args == {"d": 5}


def test_constructor_call_is_recorded_for_positional_and_keyword_calls():
    m = ViT1D(250, 25, embed_dim=8, depth=1, num_heads=2)
    assert m._constructor_args == {**_ctor_defaults(ViT1D), "seq_len": 250, "patch_size": 25, "embed_dim": 8,
                                   "depth": 1, "num_heads": 2}
    # a call that does not bind records nothing, and __init__ still raises the usual error
    with pytest.raises(TypeError):
        ViT1D(no_such=1)

    class Star(Backbone):
        def __init__(self, *parts: int, **extra: int) -> None:
            super().__init__()

    assert Star(1, 2)._constructor_args is None                   # positional varargs: not keyword-expressible
    assert Star(a=1)._constructor_args == {"a": 1}


def test_copy_and_pickle_keep_the_backbone_and_its_arguments():
    model = create_backbone("resnet1d_test").eval()
    x = torch.randn(2, 12, 250)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.init_args == model.init_args and clone.name == "resnet1d_test"
        with torch.no_grad():
            assert torch.equal(clone.embed(x), model.embed(x))


def test_registry_imports_nothing_from_the_models_it_lists():
    # No import circle: the models import the registry; the package __init__ imports the models (registration).
    import ast
    import importlib
    import pathlib
    import sys

    tree = ast.parse(pathlib.Path(registry.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("ecgfm")], imported
    assert "importlib" not in imported
    # every model module of the package is imported (so registered) by importing the package
    importlib.import_module("ecgfm.backbones")
    for path in pathlib.Path(registry.__file__).parent.glob("*.py"):
        if path.stem not in ("__init__", "registry"):
            assert f"ecgfm.backbones.{path.stem}" in sys.modules, f"{path.name}: add it to ecgfm/backbones/__init__.py"


def test_size_factories_name_their_class(monkeypatch):
    # ecgfm.config checks a backbone's config keys against the class a factory's return annotation names
    import typing

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_sizes(ViT1D, {"vit1d_probe_size": {"embed_dim": 8, "depth": 1, "num_heads": 2}})
    factory = registry._REGISTRY["vit1d_probe_size"]
    assert typing.get_type_hints(factory)["return"] is ViT1D and factory.__name__ == "vit1d_probe_size"
    assert create_backbone("vit1d_probe_size", seq_len=50, patch_size=25).num_features == 8
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_sizes(ViT1D, {"vit1d_probe_size": {}})
