"""Head scores from how the loss responds to each head: leave-one-out ablation, gate gradients, integrated gradients.

Measured on calibration windows with the model as loaded (no mask): call these functions outside
``apply_mask``. No weight is written: the ablation metric prunes one head at a time through the
incremental evaluator, and the gradient metrics multiply each head's output by a gate (1 for the
gradient, 0 to 1 along the integration path) for the duration of one pass. Scores are float64
tensors ``[num_layers, num_heads]``; a *low* score means "cheap to remove". The registry that
names them is :mod:`analysis.importance`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from analysis.architecture import Architecture
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, Progress
from analysis.hooks import PreHook, observe
from analysis.masks import Mask


def ablation(
    arch: Architecture, windows: Windows, layers: Sequence[int] | None = None, progress: Progress | None = None
) -> torch.Tensor:
    """Leave-one-out: increase in mean NLL when only query head (l, h) is pruned.

    ``score[l, h] = NLL(mask with head (l, h) pruned) - NLL(unpruned)``, mean next-token NLL over the
    windows' predicted tokens (Michel et al., "Are Sixteen Heads Really Better than One?", 2019,
    ablation study). Uses the incremental evaluator, so a head in layer l costs only layers l..L-1
    and the head. ``layers`` restricts the work to those layers; other rows are NaN.
    """
    shape = arch.shape
    chosen = sorted(set(layers)) if layers is not None else list(range(shape.num_layers))
    evaluator = IncrementalEvaluator(arch, windows)
    base = Mask.unpruned(shape, "")
    reference = evaluator.perplexity(base).mean_nll
    scores = torch.full((shape.num_layers, shape.num_heads), float("nan"), dtype=torch.float64)
    total = len(chosen) * shape.num_heads
    for i, (layer, head) in enumerate((layer, head) for layer in reversed(chosen) for head in range(shape.num_heads)):
        scores[layer, head] = evaluator.perplexity(base.with_head(layer, head, False)).mean_nll - reference
        if progress:
            progress(i + 1, total)
    return scores


def _gate_hooks(arch: Architecture, gates: Callable[[], torch.Tensor]) -> list[tuple[nn.Module, PreHook]]:
    """Pre-hooks multiplying each query head's slice of the o_proj input by ``gates()[layer, head]``."""
    head_dim = arch.shape.head_dim

    def gate(layer: int) -> PreHook:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
            x = args[0]
            g = gates()[layer].to(dtype=x.dtype, device=x.device).repeat_interleave(head_dim)
            return (x * g, *args[1:]), kwargs

        return hook

    return arch.head_output_hooks(gate)


def _loss(arch: Architecture, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the predicted tokens of ``ids``, differentiable, in at least float32."""
    logits = arch.logits(arch.final_hidden(ids)[:, :-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].to(logits.device).flatten())


def gradient(arch: Architecture, windows: Windows, progress: Progress | None = None) -> torch.Tensor:
    """Head-gate gradient: ``score[l, h] = mean over windows of |dL_w / dg_(l,h)|`` at g = 1.

    A gate g multiplies each query head's output in front of o_proj; L_w is the mean next-token NLL
    of window w (Michel et al., 2019, eq. 2: the expected absolute sensitivity of the loss to
    masking the head, a first-order estimate of the ablation score). One forward and backward pass
    per window; the weights get no gradient.
    """
    shape = arch.shape
    gates = torch.ones(shape.num_layers, shape.num_heads, dtype=torch.float32, requires_grad=True)
    scores = torch.zeros(shape.num_layers, shape.num_heads, dtype=torch.float64)
    ids_all = windows.input_ids
    with torch.enable_grad(), observe(pre=_gate_hooks(arch, lambda: gates)):
        for w in range(ids_all.shape[0]):
            (grad,) = torch.autograd.grad(_loss(arch, ids_all[w : w + 1]), gates)
            scores += grad.abs().double()
            if progress:
                progress(w + 1, ids_all.shape[0])
    return scores / ids_all.shape[0]


def gradient_normalized(arch: Architecture, windows: Windows, progress: Progress | None = None) -> torch.Tensor:
    """Head-gate gradient (:func:`gradient`) divided by its l2 norm over each layer's heads.

    Source: Michel et al., "Are Sixteen Heads Really Better than One?" (NeurIPS 2019); their code
    (pmichel31415/are-16-heads-really-better-than-1) normalises the importance scores of every layer
    by their l2 norm by default before ranking heads across layers, which is what global allocation
    needs: raw gradients of different layers differ in scale. A layer whose heads all score 0 stays 0.
    """
    return per_layer_l2(gradient(arch, windows, progress))


def per_layer_l2(scores: torch.Tensor) -> torch.Tensor:
    """``[num_layers, num_heads]`` scores divided by each layer's l2 norm (a layer of zeros stays zeros)."""
    norm = torch.linalg.vector_norm(scores, dim=1, keepdim=True)
    return scores / torch.where(norm > 0, norm, torch.ones_like(norm))


IG_STEPS = 8  # Gauss-Legendre points from gates 0 to 1: accurate where the loss is smooth along the path


@dataclass(frozen=True, eq=False)
class GateAttribution:
    """Integrated gradients of the loss over the per-head gates, with its completeness check.

    ``scores[l, h] = -IG_(l,h)``: the part of the loss increase from removing every head (gates 1 -> 0)
    that the path integral attributes to head (l, h). Completeness (Sundararajan et al., 2017,
    axiom 1) says the scores sum to ``loss_no_heads - loss_all_heads``; ``completeness_error`` is how
    far the numerical integral is from that. It is worth showing: on a trained model the path passes
    through models far from anything seen in training, where the loss can be rough (SmolLM2-135M,
    one window: the loss moves by ~0.1 nats between gate scales 0.049 and 0.052 while it is smooth
    above ~0.7), and there no quadrature of a few points integrates it well.
    """

    scores: torch.Tensor
    loss_all_heads: float
    loss_no_heads: float
    steps: int

    @property
    def completeness_error(self) -> float:
        return float(self.scores.sum()) - (self.loss_no_heads - self.loss_all_heads)

    def details(self) -> dict[str, float]:
        return {
            "loss_all_heads": self.loss_all_heads,
            "loss_no_heads": self.loss_no_heads,
            "attribution_sum": float(self.scores.sum()),
            "completeness_error": self.completeness_error,
            "steps": self.steps,
        }


def integrated_gradients(
    arch: Architecture, windows: Windows, progress: Progress | None = None, steps: int = IG_STEPS
) -> GateAttribution:
    """Captum's integrated gradients of the mean NLL w.r.t. all head gates, from gates 0 to gates 1.

    IG is linear in the function, so the attribution of the mean loss is the mean of the per-window
    attributions: captum runs one window at a time (one step per backward pass), which bounds memory
    by one window's autograd graph. Cost per window: ``steps`` forward and backward passes, and two
    forward passes for the end points of the completeness check.

    Refused for families with a post-attention norm (Gemma): that norm is scale-invariant, so when
    all gates of a layer shrink together the loss does not change until they are within ~sqrt(eps)
    of 0, and the path integral is a spike no quadrature resolves.
    """
    from captum.attr import IntegratedGradients

    if arch.has_post_attention_norm:
        raise HeadroomError(
            f"integrated_gradients is not defined usefully for {arch.family}: its post-attention norm undoes "
            "the gates' scale, so the path integral is a spike at 0; use the gradient or ablation metric"
        )
    shape = arch.shape
    gates = torch.ones(1, shape.num_layers * shape.num_heads)
    current: list[torch.Tensor] = []
    ids_all = windows.input_ids
    total = torch.zeros(shape.num_layers * shape.num_heads, dtype=torch.float64)
    end_losses = torch.zeros(2, dtype=torch.float64)
    with torch.enable_grad(), observe(pre=_gate_hooks(arch, lambda: current[0].view(shape.num_layers, -1))):
        for w in range(ids_all.shape[0]):
            ids = ids_all[w : w + 1]

            def loss_at(g: torch.Tensor, ids: torch.Tensor = ids) -> torch.Tensor:
                current[:] = [g[0]]
                return _loss(arch, ids).reshape(1)

            attribution = IntegratedGradients(loss_at).attribute(
                gates,
                baselines=torch.zeros_like(gates),
                n_steps=steps,
                method="gausslegendre",
                internal_batch_size=1,
            )
            total += attribution[0].double()
            with torch.no_grad():
                end_losses += torch.tensor([loss_at(gates).item(), loss_at(torch.zeros_like(gates)).item()])
            if progress:
                progress(w + 1, ids_all.shape[0])
    n = ids_all.shape[0]
    loss_all, loss_none = (end_losses / n).tolist()
    return GateAttribution(-(total / n).view(shape.num_layers, -1), loss_all, loss_none, steps)
