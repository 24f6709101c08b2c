"""The recipe's levers (components/training/recipe.py, presets.py) on real sample photos.

Each lever is off by default; these tests show what each does when on: the online policy and
erasing are keyed by (seed, epoch, photo) in both data paths, low-resolution epochs come first,
the schedule warms up then follows the cosine, the head gets its own learning rate, mixup/cutmix
give class probabilities, the EMA weights are what model_best keeps, and a preset reaches
`shopvision train` and the pipeline as explicit values.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from imagefactory import split_tree

from shopvision.cli import build_parser
from shopvision.components.errors import StepError
from shopvision.components.training.gpu_decode import BytesBatchPreparer, collate_bytes
from shopvision.components.training.models import ModelSpec, build_model, load_backbone, read_state_dict
from shopvision.components.training.presets import (
    PRESETS,
    parse_recipe,
    pipeline_arguments,
    recipe_arguments,
)
from shopvision.components.training.recipe import (
    Augmentation,
    BatchMixer,
    ema_model,
    hard_targets,
    parameter_groups,
    warmup_cosine,
)
from shopvision.components.training.train import TrainConfig, run
from shopvision.components.training.train_data import TrainPhotos

CPU = SimpleNamespace(rank=0, world_size=1, distributed=False, device=torch.device("cpu"))


def test_the_policy_and_erasing_are_keyed_by_photo_and_epoch_in_both_data_paths(tmp_path, sample_raw):
    data = split_tree(tmp_path, sample_raw, per_category=3)
    labels = sorted(p.name for p in (data / "train").iterdir())
    spec = ModelSpec("resnet18", labels, image_size=48)
    aug = Augmentation(policy="trivialaugment", erasing=1.0, image_size=48)
    plain = TrainPhotos(data / "train", labels, spec, seed=1, decode="cpu")
    strong = TrainPhotos(data / "train", labels, spec, seed=1, decode="cpu", aug=aug)
    as_bytes = TrainPhotos(data / "train", labels, spec, seed=1, decode="gpu", aug=aug)
    prepare = BytesBatchPreparer(as_bytes, spec, 1, torch.device("cpu"), torch.float32, False)
    changed = 0
    for epoch in range(4):
        image, _ = strong[(0, epoch)]
        assert torch.equal(image, strong[(0, epoch)][0])  # the same key, the same photo
        batch, _ = prepare(collate_bytes([as_bytes[(0, epoch)]]))
        assert torch.allclose(batch[0], image, atol=1e-4), epoch
        changed += not torch.allclose(image, plain[(0, epoch)][0])
    assert changed == 4  # erasing at probability 1 changes every photo
    assert not torch.equal(strong[(0, 0)][0], strong[(0, 1)][0])


def test_low_resolution_epochs_come_first(tmp_path, sample_raw):
    data = split_tree(tmp_path, sample_raw, categories=1, per_category=1)
    spec = ModelSpec("resnet18", [next((data / "train").iterdir()).name], image_size=64)
    aug = Augmentation(image_size=64, low_res_size=32, low_res_epochs=2)
    photos = TrainPhotos(data / "train", spec.labels, spec, seed=0, decode="cpu", aug=aug)
    assert [photos[(0, epoch)][0].shape[-1] for epoch in range(4)] == [32, 32, 64, 64]
    with pytest.raises(StepError, match="needs --low-res-size"):
        Augmentation(low_res_epochs=2)
    with pytest.raises(StepError, match="choose from crop-flip"):
        Augmentation(policy="autoaugment")


def test_warmup_then_cosine_and_without_warmup_exactly_the_cosine():
    factor = warmup_cosine(10, 2)
    assert [round(factor(e), 4) for e in range(3)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0]
    assert factor(9) < 0.05 and all(factor(e) > factor(e + 1) for e in range(2, 9))
    plain = warmup_cosine(10, 0)
    assert [plain(e) for e in range(10)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * e / 10)) for e in range(10)]
    )
    with pytest.raises(StepError, match="below --epochs"):
        warmup_cosine(3, 3)


def test_the_new_head_gets_its_own_learning_rate():
    model = build_model(ModelSpec("resnet18", ["a", "b"]))
    groups = parameter_groups(model, "fc.", lr=0.01, head_lr_scale=10)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    assert sum(p.numel() for p in groups[1]["params"]) == model.fc.weight.numel() + model.fc.bias.numel()
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(StepError, match="above 0"):
        parameter_groups(model, "fc.", 0.01, 0)


def test_mixup_and_cutmix_give_class_probabilities_drawn_per_step():
    images = torch.rand(8, 3, 16, 16)
    targets = torch.arange(8) % 4
    mixer = BatchMixer(4, mixup=0.4, cutmix=1.0, seed=0)
    mixed, soft = mixer(images, targets, step_key=3)
    assert soft.shape == (8, 4) and torch.allclose(soft.sum(1), torch.ones(8))
    assert not torch.equal(mixed, images)
    again, soft_again = mixer(images, targets, step_key=3)
    assert torch.equal(again, mixed) and torch.equal(soft_again, soft)
    assert hard_targets(soft).shape == (8,) and torch.equal(hard_targets(targets), targets)
    assert not BatchMixer(4, 0, 0, 0).active


def test_the_ema_moves_toward_the_weights_by_its_decay():
    model = torch.nn.Linear(2, 1)
    ema = ema_model(model, 0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight += 1.0
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight += 1.0
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, start + 0.9 * 1.0 + 0.1 * 2.0)
    assert ema_model(model, 0) is None
    with pytest.raises(StepError, match="decay in"):
        ema_model(model, 1.5)


def test_a_run_with_every_lever_keeps_the_ema_weights_as_model_best(tmp_path, sample_raw):
    data = split_tree(tmp_path / "data", sample_raw, per_category=3)
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path / "out"), arch="resnet18", epochs=2, batch_size=4, workers=0,
        lr=0.01, image_size=40, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", augment="randaugment",
        random_erasing=0.5, mixup=0.2, cutmix=1.0, warmup_epochs=1, head_lr_scale=5.0, ema=0.9,
        low_res_size=32, low_res_epochs=1, max_steps_per_epoch=2,
    )  # fmt: skip
    best = run(cfg)
    # model_best.pt is the checkpoint of the best epoch: its EMA, not its raw weights, was kept.
    state = torch.load(tmp_path / "out" / "model_best.pt", weights_only=False)
    assert state["epoch"] == best["epoch"] + 1
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    kept = read_state_dict(tmp_path / "out" / "model_best" / "weights.pt")
    assert kept.keys() == ema.keys()
    assert all(torch.equal(kept[k], ema[k]) for k in kept)
    assert any(not torch.equal(kept[k], state["model"][k]) for k in kept if kept[k].is_floating_point())


def test_recipe_text_is_checked_and_becomes_train_options():
    assert parse_recipe("ema=0.99, augment=trivialaugment,low_res_epochs=3") == {
        "ema": 0.99,
        "augment": "trivialaugment",
        "low_res_epochs": 3,
    }
    args = recipe_arguments("ema=0.99,head_lr_scale=10")
    assert args == ["--ema", "0.99", "--head-lr-scale", "10.0"]
    parsed = build_parser().parse_args(["train", "d", "--out", "o", *args])
    assert (parsed.ema, parsed.head_lr_scale) == (0.99, 10.0)
    with pytest.raises(StepError, match="KEY one of"):
        parse_recipe("emma=0.99")
    with pytest.raises(StepError, match="is not a int"):
        parse_recipe("low_res_epochs=three")
    assert parse_recipe("") == {}


def test_train_preset_sets_the_recipe_and_a_flag_still_wins():
    from shopvision.commands.train import _config

    raw = ["train", "d", "--out", "o", "--preset", "product-photos", "--epochs", "1"]
    args = build_parser().parse_args(raw)
    args.raw_argv = raw
    cfg = _config(args)
    recipe = PRESETS["product-photos"]["train"]
    assert cfg.epochs == 1 and cfg.arch == recipe["arch"] and cfg.pretrained == "imagenet"
    for key, value in recipe["recipe"].items():
        assert getattr(cfg, key) == value, key


def test_pipeline_preset_expands_to_parameters_the_pipeline_has(tmp_path):
    from shopvision.commands.pipeline import _arguments
    from shopvision.pipelines.cluster import pipeline_parameters

    args = SimpleNamespace(arg=["preset=product-photos", "epochs=2"], taxonomy=None)
    arguments = _arguments(args, {"data_location": "x"})
    assert arguments["epochs"] == 2 and arguments["data_location"] == "x"
    assert set(pipeline_arguments("product-photos")) <= set(pipeline_parameters())
    assert parse_recipe(arguments["train_recipe"]) == PRESETS["product-photos"]["train"]["recipe"]
    with pytest.raises(StepError, match="unknown preset"):
        _arguments(SimpleNamespace(arg=["preset=fast"], taxonomy=None), {})


@pytest.mark.parametrize("arch", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_efficientnet_lites_load_their_offline_imagenet_weights(arch):
    from shopvision.components.training.weights import fetch_pretrained

    model = build_model(ModelSpec(arch, ["a", "b", "c"]))
    left = load_backbone(model, arch, fetch_pretrained("imagenet", arch))
    assert left == ["_fc.bias", "_fc.weight"]


def test_resnet_imagenet_weights_a_user_brings_load_by_path_and_must_fit(tmp_path, sample_raw):
    """As a cluster user brings torchvision's ResNet ImageNet weights (a state dict with a 1000-way
    head): here a state dict the test makes, in the same format."""
    import torchvision

    torch.manual_seed(3)
    weights = tmp_path / "resnet18-imagenet.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=1000).state_dict(), weights)
    data = split_tree(tmp_path / "data", sample_raw, per_category=3)
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path / "out"), arch="resnet18", epochs=1, batch_size=4, workers=0,
        image_size=32, pretrained=str(weights), freeze_backbone=True, max_steps_per_epoch=1,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )  # fmt: skip
    run(cfg)
    brought = torch.load(weights, weights_only=True)
    kept = read_state_dict(tmp_path / "out" / "model_best" / "weights.pt")
    assert torch.equal(kept["conv1.weight"], brought["conv1.weight"])
    assert torch.equal(kept["layer4.1.bn2.running_var"], brought["layer4.1.bn2.running_var"])
    assert kept["fc.weight"].shape == (3, 512)
    for other in ("resnet34", "resnet50"):  # more blocks of the same shapes; other shapes
        torch.save(getattr(torchvision.models, other)(weights=None).state_dict(), tmp_path / f"{other}.pt")
        bad = {**cfg.__dict__, "pretrained": str(tmp_path / f"{other}.pt"), "out": str(tmp_path / other)}
        with pytest.raises(StepError, match="do not fit resnet18: .* are not resnet18's"):
            run(TrainConfig(**bad))
