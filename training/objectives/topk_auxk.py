"""TopK + AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

loss = FVU(x, x_hat) + alpha * FVU(e, e_hat), where e = x - x_hat (detached) is the residual
and e_hat decodes it from the top `auxk_k` pre-activations among *dead* latents only (not
fired for `dead_tokens` tokens). AuxK gives dead latents a gradient toward what the live ones
miss; it is scaled down while fewer latents are dead than auxk_k (as sparsify does).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from sae.base import Dictionary, ForwardOutput
from sae.sparse_grad import codes_from_indices, decode_active, gather_pre_acts
from training.objectives.base import LossOutput, Objective, StepContext, fvu, register_objective


def auxk_loss(
    d: Dictionary,
    x: Float[Tensor, "B D"],
    y: Float[Tensor, "B O"],
    out: ForwardOutput,
    dead: Tensor,
    auxk_k: int,
) -> Tensor:
    """FVU of the residual y - y_hat reconstructed from the top-`auxk_k` dead latents of x's
    codes (0 if none dead; y is x for a sparse autoencoder)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    k_aux = min(auxk_k, n_dead)
    residual = (y - out.x_hat).detach()
    dead_ids = dead.nonzero().squeeze(-1)  # rank the dead columns only, not all B x F
    acts, j = out.pre_acts.index_select(1, dead_ids).topk(k_aux, dim=-1, sorted=False)
    idx = dead_ids[j]
    if out.pre_acts.requires_grad:  # the dense forward
        e_hat = d.decode_sparse(torch.relu(acts), idx) - d.b_dec
    else:  # the sparse forward: gradients through the chosen dead latents only
        codes = codes_from_indices(idx, d.d_sae)
        acts = torch.relu(gather_pre_acts(d, x, out.pre_acts, codes))
        e_hat = decode_active(acts, codes, d.W_dec)
    scale = min(n_dead / auxk_k, 1.0)
    return scale * fvu(residual, e_hat)


@register_objective("topk_auxk")
class TopKAuxK(Objective):
    architecture = "topk"
    sparsity_penalty = "none"
    unit_norm_decoder = True

    def auxk_k(self) -> int:
        return self.cfg.auxk_k or max(1, (self.d_out or self.d_in) // 2)

    def loss(
        self, d: Dictionary, x: Float[Tensor, "B D"], y: Float[Tensor, "B O"], ctx: StepContext
    ) -> LossOutput:
        out = d(x)
        main = fvu(y, out.x_hat)
        parts = {"fvu": main.detach()}
        loss = main
        if self.cfg.auxk_coefficient > 0:
            dead = ctx.tokens_since_fired >= self.cfg.dead_tokens
            aux = auxk_loss(d, x, y, out, dead, self.auxk_k())
            loss = loss + self.cfg.auxk_coefficient * aux
            parts["auxk"] = aux.detach()
        return LossOutput(loss, out, parts)
