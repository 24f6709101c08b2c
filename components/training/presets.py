"""Named training recipes, and the `train_recipe` text that carries the recipe's levers through
the pipeline to `shopvision train`.

Why a preset is plain data: `shopvision train --preset NAME` and the pipeline's `--arg preset=NAME`
read the same mapping, so bench/grocery_accuracy.sh measures exactly what a pipeline run trains, and
a KFP run shows the expanded values as its parameters, not a name whose meaning could change.
Torch-free: the CLI and the pipeline client import it before anything heavy.
"""

from __future__ import annotations

from ..errors import StepError

# `train_recipe` keys → (the `shopvision train` option, its type).
RECIPE_OPTIONS: dict[str, type] = {
    "augment": str,
    "random_erasing": float,
    "mixup": float,
    "cutmix": float,
    "warmup_epochs": int,
    "head_lr_scale": float,
    "ema": float,
    "low_res_size": int,
    "low_res_epochs": int,
    "label_smoothing": float,
    "weight_decay": float,
}

# Product photos: chosen on the grocery set's validation photos (drawn from its train_* photos
# only: 90.9% top-1), measured once on the held-out val_* photos: 75.0%, below the plain fine-tune's
# 80.1% (README's accuracy section). A candidate for issue 17's lever table, not yet a recommendation.
PRESETS: dict[str, dict] = {
    "product-photos": {
        "train": {
            "arch": "efficientnet_lite0",
            "pretrained": "imagenet",
            "epochs": 7,
            "lr": 0.02,
            "batch_size": 32,
            "image_size": 224,
            "recipe": {
                "low_res_size": 160,
                "low_res_epochs": 7,
                "warmup_epochs": 1,
                "head_lr_scale": 10.0,
                "ema": 0.995,
                "augment": "trivialaugment",
            },
        },
        "data": {"augmentations": "", "percentile": 98.0},
    },
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise StepError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def recipe_text(recipe: dict) -> str:
    """{'ema': 0.99, ...} → 'ema=0.99,...', the pipeline parameter's form."""
    return ",".join(f"{key}={value}" for key, value in recipe.items())


def parse_recipe(text: str) -> dict:
    """'ema=0.99,augment=trivialaugment' → typed values, with a clear error for an unknown key or a
    value of the wrong type (before any pod starts)."""
    values: dict = {}
    for pair in (p.strip() for p in (text or "").split(",")):
        if not pair:
            continue
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or key not in RECIPE_OPTIONS:
            raise StepError(
                f"train_recipe: {pair!r} is not KEY=VALUE with KEY one of {', '.join(RECIPE_OPTIONS)}"
            )
        try:
            values[key] = RECIPE_OPTIONS[key](raw.strip())
        except ValueError:
            raise StepError(f"train_recipe: {key}={raw!r} is not a {RECIPE_OPTIONS[key].__name__}") from None
    return values


def recipe_arguments(text: str) -> list[str]:
    """The `shopvision train` options for a `train_recipe` text."""
    args: list[str] = []
    for key, value in parse_recipe(text).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def pipeline_arguments(name: str) -> dict:
    """The pipeline parameters a preset sets (an explicit --arg still wins over them)."""
    chosen = preset(name)
    train = chosen["train"]
    return {
        **chosen.get("data", {}),
        "arch": train["arch"],
        "pretrained": train.get("pretrained", ""),
        "epochs": train["epochs"],
        "lr": train["lr"],
        "batch_size": train["batch_size"],
        "train_image_size": train["image_size"],
        "train_recipe": recipe_text(train.get("recipe", {})),
    }


def train_defaults(name: str) -> dict:
    """The `shopvision train` option values a preset sets (argparse dest names)."""
    train = dict(preset(name)["train"])
    return {**{k: v for k, v in train.items() if k != "recipe"}, **train.get("recipe", {})}
