"""Typed recipes: one YAML file says which model, data stream, LoRA, method(s) and training to run.

>>> recipe = load_recipe("recipes/tiny.yaml", ["training.lr=1.0e-4", "method=vanilla"])
>>> check_recipe(recipe)          # offline: data paths, method, LoRA targets on a meta-device model

Every problem is one :class:`RecipeError` line, ``<file>:<line>: <what is wrong>; <how to fix it>``.
"""


from lora_cl.recipe.build import recipe_from_dict
from lora_cl.recipe.checks import check_recipe, meta_model, model_config
from lora_cl.recipe.loading import dump_recipe, load_recipe
from lora_cl.recipe.schema import (
    BUILTIN_PREFIXES,
    DTYPES,
    METRICS,
    NONFINITE,
    QUANTIZATIONS,
    TRAINERS,
    DataConfig,
    DomainConfig,
    EvalConfig,
    LoraSettings,
    MethodChoice,
    ModelConfig,
    Recipe,
    RecipeError,
    TrainingConfig,
    is_builtin,
)

__all__ = [
    "BUILTIN_PREFIXES", "DTYPES", "METRICS", "NONFINITE", "QUANTIZATIONS", "TRAINERS", "DataConfig",
    "DomainConfig", "EvalConfig", "LoraSettings", "MethodChoice", "ModelConfig", "Recipe", "RecipeError",
    "TrainingConfig", "check_recipe", "dump_recipe", "is_builtin", "load_recipe", "meta_model",
    "model_config", "recipe_from_dict",
]
