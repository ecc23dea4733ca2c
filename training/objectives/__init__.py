"""Training objectives, one small registered file each; importing this package registers them."""

from training.objectives import (  # noqa: F401
    batchtopk,
    jumprelu,
    matryoshka_batchtopk,
    relu_l1,
    relu_l1_2024,
    topk_auxk,
)
from training.objectives.base import (
    OBJECTIVES,
    LossOutput,
    Objective,
    StepContext,
    register_objective,
)

__all__ = ["OBJECTIVES", "LossOutput", "Objective", "StepContext", "register_objective"]
