"""Classical scikit-learn baselines, registered as models: `logreg` and `hgb`.

They are not torch modules: `train.py` and `predict.py` see the class attribute `classical = True` on the
config dataclass and hand the run to `engine/classical.py` (features, fitting, model selection on the
validation split, saving). Their config dataclasses are registered here so that configs, overrides,
`--help-config`, the configuration reference and the sweep grids treat them like every other model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from model.registry import register_model

__all__ = ["LogRegConfig", "HGBConfig", "is_classical"]


def is_classical(model_cfg) -> bool:
    """True for the config dataclass of a scikit-learn model."""
    return bool(getattr(type(model_cfg), "classical", False))


def _check_pool(pool: int) -> None:
    if pool < 1:
        raise ValueError(f"model.pool = {pool} must be at least 1")


@dataclass
class PooledFeaturesConfig:
    """What both estimators share: the features (and the marker that tells the engine it is not a torch model)."""

    classical: ClassVar[bool] = True

    pool: int = field(default=2, metadata={
        "min": 1, "max": 64, "help": "features: the volume average-pooled by this factor per axis (2: 28³ -> 14³), "
                                     "then standardised (must divide the volume side)"})

    def __post_init__(self):
        _check_pool(self.pool)


@dataclass
class LogRegConfig(PooledFeaturesConfig):
    c_grid: list[float] = field(default_factory=lambda: [0.0001, 0.001, 0.01, 0.1, 1.0], metadata={
        "help": "inverse L2 strengths tried; the one with the best validation AUC is kept (ties: the smallest C); "
                "the model is fitted on the training split only"})
    max_iter: int = field(default=2000, metadata={"min": 1, "help": "lbfgs iterations per fit"})

    def __post_init__(self):
        super().__post_init__()
        if not self.c_grid:
            raise ValueError("model.c_grid is empty; give at least one C > 0, e.g. [0.001, 0.01, 0.1]")
        bad = [c for c in self.c_grid if not c > 0]
        if bad:
            raise ValueError(f"model.c_grid holds {bad[0]!r}; every C must be > 0")


@dataclass
class HGBConfig(PooledFeaturesConfig):
    learning_rate: float = field(default=0.1, metadata={"min": 1e-6, "max": 1.0, "help": "boosting shrinkage"})
    max_iter: int = field(default=500, metadata={
        "min": 1, "max": 100000, "help": "most boosting iterations (early stopping usually ends sooner)"})
    n_iter_no_change: int = field(default=20, metadata={
        "min": 1, "help": "early stopping: stop when the validation AUC has not improved for this many iterations; "
                          "the iteration count with the best validation AUC is kept"})
    max_leaf_nodes: int = field(default=31, metadata={"min": 2, "help": "leaves per tree"})
    min_samples_leaf: int = field(default=20, metadata={"min": 1, "help": "samples per leaf"})
    l2_regularization: float = field(default=0.0, metadata={"min": 0.0, "help": "L2 penalty on leaf values"})


def _not_a_module(cfg, *, in_channels: int, num_classes: int, input_size: int):
    raise TypeError("a scikit-learn baseline is not a torch module; train.py and predict.py run it through "
                    "engine/classical.py")


register_model("logreg", LogRegConfig, help="scikit-learn logistic regression (L2) on average-pooled voxels; "
                                            "C chosen on the validation split")(_not_a_module)
register_model("hgb", HGBConfig, help="scikit-learn HistGradientBoostingClassifier on average-pooled voxels; "
                                      "early stopping on the validation split")(_not_a_module)
