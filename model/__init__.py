"""Models of this repository, built by name through the registry (`model.registry`).

Importing the package registers every model; `build_model("lmttm", in_channels=1, num_classes=2,
input_size=28, dim=64, memory_tokens=64)` builds one.
"""

from model.registry import (MODELS, ModelEntry, build_model, count_parameters, executed_parameter_count,
                            get_model_entry, register_model)

# Importing a model file registers it.
from model import classical, lmttm, medmamba, resnet, ttm, vit  # noqa: E402,F401

__all__ = ["MODELS", "ModelEntry", "build_model", "count_parameters", "executed_parameter_count",
           "get_model_entry", "register_model"]
