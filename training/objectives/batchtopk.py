"""BatchTopK + AuxK (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k*B largest activations across the batch (sae/architectures/batchtopk.py)
with the TopK loss (FVU + AuxK on dead latents). After each step the inference threshold is
moved toward the smallest kept activation; on save the dictionary becomes a `jumprelu` with
that threshold on every feature, so inference does not depend on the batch. The threshold
is a buffer of the dictionary, so checkpoints carry it with the weights.
Under data parallelism each process selects within its own share of the batch.
"""

from __future__ import annotations

from sae.architectures.batchtopk import BatchTopKDictionary
from sae.base import Dictionary, ForwardOutput
from training.objectives.base import register_objective
from training.objectives.topk_auxk import TopKAuxK


@register_objective("batchtopk")
class BatchTopK(TopKAuxK):
    architecture = "batchtopk"

    def after_optimizer_step(self, d: Dictionary, out: ForwardOutput) -> None:
        super().after_optimizer_step(d, out)
        assert isinstance(d, BatchTopKDictionary)
        d.update_threshold(out.feature_acts.detach(), lr=self.cfg.threshold_lr)

    def finalize(self, d: Dictionary) -> Dictionary:
        assert isinstance(d, BatchTopKDictionary)
        return d.to_inference()
