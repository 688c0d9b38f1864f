"""Loading the models users have (evidencemap.models.loading)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import evidencemap as em
from cli_helpers import Tiny2D, on_sys_path, registered_input_method, write_tiny3d_module
from evidencemap import GradCAM, models
from evidencemap.methods.registry import applicable_methods, check_method_supports
from evidencemap.models.loading import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_FORMS,
    input_kind,
    load_model,
    read_labels,
)

# torch 2.13 marks torch.jit deprecated; TorchScript files are still what many users have.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(scope="module")
def builtin():
    return load_model("efficientnet-lite0")


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- built-in


def test_builtin_is_the_library_model_with_its_labels_and_preprocessing(builtin):
    reference = models.load("efficientnet-lite0")
    assert builtin.source == "builtin"
    assert builtin.kind == "image"
    assert not builtin.module.training
    assert builtin.labels == models.labels()
    assert builtin.label(282) == "tiger cat"
    assert builtin.preprocess == reference.preprocess
    _same_outputs(builtin.module, reference, (1, 3, 224, 224))


def test_builtin_rejects_preprocessing_options():
    with pytest.raises(ValueError, match="brings its own preprocessing"):
        load_model("efficientnet-lite0", input_size=128)


def test_class_index_by_index_label_and_case(builtin):
    assert builtin.class_index("282") == 282
    assert builtin.class_index("tiger cat") == 282
    assert builtin.class_index("Tiger Cat") == 282
    with pytest.raises(ValueError, match="similar labels: 'tiger cat'"):
        builtin.class_index("tiger kat")
    with pytest.raises(ValueError, match="out of range"):
        builtin.class_index("1000")
    with pytest.raises(ValueError, match=">= 0"):
        builtin.class_index("-3")


# --------------------------------------------------------------------------- TorchScript


def test_torchscript_file_loads_and_matches_the_eager_model(tmp_path):
    eager = Tiny2D().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(eager), str(path))
    loaded = load_model(str(path), input_size=32)
    assert loaded.source == "torchscript"
    assert loaded.kind == "image"
    assert loaded.labels is None
    assert loaded.label(2) == "class 2"
    assert loaded.preprocess is not None
    assert loaded.preprocess.size == 32
    _same_outputs(loaded.module, eager, (2, 3, 32, 32))


def test_traced_model_is_recognised_as_torchscript(tmp_path):
    eager = Tiny2D().eval()
    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(eager, torch.zeros(1, 3, 16, 16)), str(path))
    loaded = load_model(str(path))
    assert loaded.source == "torchscript"
    _same_outputs(loaded.module, eager, (1, 3, 16, 16))


def test_layer_methods_on_torchscript_get_a_clear_error(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(Tiny2D().eval()), str(path))
    loaded = load_model(str(path))
    with pytest.raises(ValueError, match="TorchScript") as info:
        check_method_supports(loaded, GradCAM)
    assert "torch.save(model, path)" in str(info.value)
    with registered_input_method() as method:
        check_method_supports(loaded, method)  # input-space methods are fine
    # The refusal recommends only methods that apply: no attention method for a CNN.
    assert "attention" not in str(info.value)
    assert "saliency" in str(info.value)


def test_applicable_methods_say_why_attention_does_not_apply_to_a_cnn():
    from vit_helpers import TinyViT

    on_cnn = applicable_methods(Tiny2D().eval())
    assert set(on_cnn) == set(em.methods())
    assert "transformer" in on_cnn["attention_rollout"]
    assert "transformer" in on_cnn["attention_gradient"]
    assert on_cnn["gradcam"] is None
    assert on_cnn["saliency"] is None
    on_vit = applicable_methods(TinyViT().eval())
    assert on_vit["attention_rollout"] is None
    assert on_vit["gradcam"] is None
    with pytest.raises(ValueError, match="needs a transformer"):
        check_method_supports(Tiny2D().eval(), "attention_rollout")


# --------------------------------------------------------------------------- pickled files


def test_pickled_model_file(tmp_path):
    name = write_tiny3d_module(tmp_path)
    with on_sys_path(tmp_path):
        module = __import__(name)
        eager = module.build()
        path = tmp_path / "tiny3d.pt"
        torch.save(eager, path)
        loaded = load_model(str(path))
        assert loaded.source == "pickle"
        assert loaded.kind == "volume"
        assert loaded.preprocess is None
        _same_outputs(loaded.module, eager, (1, 1, 6, 7, 8))


def test_pickled_model_whose_class_is_gone(tmp_path):
    name = write_tiny3d_module(tmp_path, "vanishing_models")
    with on_sys_path(tmp_path):
        torch.save(__import__(name).build(), tmp_path / "orphan.pt")
    (tmp_path / f"{name}.py").unlink()
    with pytest.raises(ValueError, match="cannot be imported"):
        load_model(str(tmp_path / "orphan.pt"))


def test_state_dict_file_is_not_a_model(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(Tiny2D().state_dict(), path)
    with pytest.raises(ValueError, match="state dict"):
        load_model(str(path))


def test_file_that_is_no_model_at_all(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a model")
    with pytest.raises(ValueError, match="neither a TorchScript nor a pickled model"):
        load_model(str(path))


# --------------------------------------------------------------------------- import strings


def test_import_string_factory_and_module_attribute(tmp_path):
    name = write_tiny3d_module(tmp_path, "factory_models")
    with on_sys_path(tmp_path):
        built = load_model(f"{name}:build")
        attribute = load_model(f"{name}:MODEL")
        assert built.source == attribute.source == "import"
        assert built.kind == attribute.kind == "volume"
        _same_outputs(built.module, attribute.module, (1, 1, 4, 5, 6))
        with pytest.raises(ValueError, match=r"not a torch\.nn\.Module"):
            load_model(f"{name}:not_a_model")
        with pytest.raises(ValueError, match="has no attribute"):
            load_model(f"{name}:missing")


def test_import_string_of_a_missing_module():
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_package_xyz\.models'"):
        load_model("no_such_package_xyz.models:build")


# --------------------------------------------------------------------------- torchvision / timm


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_vision_packages_not_importable_give_a_clear_error(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # import of it now raises ImportError
    with pytest.raises(ValueError, match=f"needs {package}, which is not importable") as info:
        load_model(f"{package}:resnet18")
    assert "evidencemap[vision]" in str(info.value)


# --------------------------------------------------------------------------- anything else


def test_unknown_spec_lists_the_accepted_forms():
    with pytest.raises(ValueError, match="accepted forms") as info:
        load_model("resnet-9000")
    for form in MODEL_FORMS:
        assert form in str(info.value)
    assert "efficientnet-lite0" in str(info.value)


def test_missing_model_file():
    with pytest.raises(ValueError, match="model file not found"):
        load_model("models/missing.pt")


def test_spec_must_be_a_string_or_a_module():
    with pytest.raises(TypeError, match="string spec or a torch.nn.Module"):
        load_model(3)  # type: ignore[arg-type]


def test_a_module_is_loaded_without_attributes_and_serves_as_the_model():
    module = Tiny2D().train()
    before = set(vars(module))
    loaded = load_model(module, input_size=32, labels=["a", "b", "c"])
    assert loaded.module is module
    assert (loaded.source, loaded.name, loaded.kind) == ("module", "Tiny2D", "image")
    assert not module.training  # eval mode, as every loaded model
    assert set(vars(module)) == before  # nothing attached
    assert loaded.preprocess is not None
    assert loaded.preprocess.size == 32
    assert loaded.label(1) == "b"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # usable where a module is: called, its attributes, every method and explain
    torch.testing.assert_close(loaded(x), module(x))
    assert loaded.fc is module.fc
    assert loaded.training is False
    a = em.explain(loaded, x, "gradcam", target=[0, 2])
    b = em.explain(module, x, "gradcam", target=[0, 2])
    torch.testing.assert_close(a.maps, b.maps)
    assert GradCAM(loaded, "conv").model is module
    with pytest.raises(TypeError, match="LoadedModel"):
        em.explain(object(), x)  # type: ignore[arg-type]


def test_builtin_modules_carry_no_attributes(builtin):
    assert isinstance(builtin.module, torch.nn.Module)
    assert not hasattr(builtin.module, "preprocess")
    assert not hasattr(builtin.module, "labels")
    assert models.load is load_model


# --------------------------------------------------------------------------- preprocessing, labels


def test_user_preprocessing_defaults_to_imagenet_mean_std_on_unit_pixels(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(Tiny2D(), path)
    loaded = load_model(str(path))
    pre = loaded.preprocess
    assert pre is not None
    assert (pre.size, pre.resize) == (224, 256)
    # (p/255 − m)/s is what the preprocessor computes from 0…255 pixels
    pixel = torch.full((3, 1, 1), 200.0)
    expected = (200.0 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    torch.testing.assert_close(((pixel - mean) / std).flatten(), expected)
    custom = load_model(str(path), input_size=96, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert custom.preprocess is not None
    assert (custom.preprocess.size, custom.preprocess.resize) == (96, 110)
    assert custom.preprocess.mean == (127.5, 127.5, 127.5)
    with pytest.raises(ValueError, match="std must be positive"):
        load_model(str(path), std=(0.5, 0.0, 0.5))


def test_labels_from_json_and_from_lines(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps(["cat", "dog", "bird"]))
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n\n")
    assert read_labels(tmp_path / "labels.json") == ["cat", "dog", "bird"]
    assert read_labels(tmp_path / "labels.txt") == ["cat", "dog", "bird"]
    model = tmp_path / "tiny.pt"
    torch.save(Tiny2D(), model)
    loaded = load_model(str(model), labels=tmp_path / "labels.txt")
    assert loaded.label(1) == "dog"
    assert loaded.class_index("bird") == 2
    (tmp_path / "bad.json").write_text('{"0": "cat"}')
    with pytest.raises(ValueError, match="JSON list of strings"):
        read_labels(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="labels file not found"):
        read_labels(tmp_path / "none.txt")


def test_input_kind_from_layers_eager_and_scripted(tmp_path):
    assert input_kind(Tiny2D()) == "image"
    name = write_tiny3d_module(tmp_path, "kind_models")
    with on_sys_path(tmp_path):
        volume_model = __import__(name).build()
        assert input_kind(volume_model) == "volume"
        assert input_kind(torch.jit.script(volume_model)) == "volume"
