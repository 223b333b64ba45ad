"""Gradient balancing between the loss terms of a step (kd, ce, feature, attention, ...).

Three methods, chosen by name (``METHODS``):

* ``none``: backward of ``sum_i w_i * L_i`` with the configured weights.
* ``pcgrad`` (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"): each term's
  gradient ``g_i = grad(w_i * L_i)`` is projected onto the normal plane of every other
  term's *original* gradient ``g_j`` it conflicts with (``g_i . g_j < 0``), visiting the
  ``j`` in a seeded random order; the projected gradients are summed.
* ``gradnorm`` (Chen et al. 2018, "GradNorm"): the weights are trained so that each term's
  gradient norm on a shared layer tracks ``mean(G) * r_i ** alpha``, where ``r_i`` is the
  term's relative inverse training rate. The weights are ``w_i = exp(s_i)`` with their own
  Adam on the log-weights ``s``; after every update they are rescaled so that
  ``sum_i w_i`` equals the sum of the configured weights (the paper's renormalisation),
  which keeps them positive without clipping.

``Balancer.backward`` *adds* to ``p.grad``, so it composes with gradient accumulation: the
engine calls it once per micro-batch with each term already divided by the step's valid
tokens (``training.module.per_step_mean``) and ``scale`` left at 1 (a caller holding raw token
sums passes ``scale = 1 / tokens_in_step`` instead). Two consequences of working per micro-batch:

* pcgrad projects the micro-batch gradients, not the accumulated step gradient (the
  projection is invariant to ``scale`` but not to how the step is split);
* gradnorm updates its weights once per call, i.e. once per micro-batch. Its loss ratios
  ``L_i / L_i(0)`` of the token-level terms share the micro-batch's token count as a common factor,
  which cancels in ``r_i``, so unequal micro-batches do not bias their weights (the per-sequence
  contrastive term does not share it: docs/losses/balancing.md). A term left out of a call keeps its weight
  (the distiller leaves out the contrastive term of a micro-batch without a pair). A call whose gradient norm at the
  shared layer is not finite (an overflow, in a step the engine skips) leaves the weights as they are.

Extra cost per call, with K active terms:

* ``none``: none (one backward).
* ``pcgrad``: K backward passes through the shared graph (one ``autograd.grad`` per term,
  the graph retained until the last) instead of one, plus K flattened fp32 copies of the
  trainable gradients in memory and O(K^2) dot products over them.
* ``gradnorm``: one extra ``autograd.grad`` per term restricted to the ``shared``
  parameters (the graph is retained for them), then the usual single backward. No second
  order terms: ``G_i = w_i * ||grad(L_i, shared)||`` is differentiated in ``w_i`` only.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import torch

EPS = 1e-12


def _grads(loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool) -> list[torch.Tensor]:
    """d loss / d params; zeros for parameters the loss does not reach."""
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _add_to_grad(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        g = g.to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)


def _weighted_sum_backward(losses: dict[str, torch.Tensor], weights: dict[str, float],
                           params: list[torch.Tensor], scale: float) -> None:
    total = sum(weights[name] * loss for name, loss in losses.items()) * scale
    if torch.is_tensor(total) and total.requires_grad:
        torch.autograd.backward(total, inputs=params)


def _backward_none(balancer: "Balancer", losses, params, shared, scale) -> dict[str, float]:
    _weighted_sum_backward(losses, balancer.weights, params, scale)
    return {f"weight/{name}": float(balancer.weights[name]) for name in losses}


def _backward_pcgrad(balancer: "Balancer", losses, params, shared, scale) -> dict[str, float]:
    names = list(losses)
    flat = []
    for k, name in enumerate(names):
        grads = _grads(balancer.weights[name] * scale * losses[name], params, retain_graph=k < len(names) - 1)
        # fp32 dot products: bf16 gradients of a large model lose the sign of small cosines.
        flat.append(torch.cat([g.reshape(-1).float() for g in grads]))
    sq_norms = [float(g.dot(g)) for g in flat]
    logs = {f"weight/{name}": float(balancer.weights[name]) for name in names}
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            denom = math.sqrt(sq_norms[a] * sq_norms[b])
            # A term without gradient (the contrastive term of a micro-batch without a pair) has no direction: NaN.
            logs[f"cos/{names[a]}_{names[b]}"] = float(flat[a].dot(flat[b])) / denom if denom > 0 else math.nan
    # One generator per call, seeded by (seed, call): the state to checkpoint is one integer.
    rng = random.Random(f"{balancer.seed}/pcgrad/{balancer.calls}")
    conflicts = 0
    total = torch.zeros_like(flat[0])
    for i in range(len(names)):
        projected = flat[i].clone()
        others = [j for j in range(len(names)) if j != i]
        rng.shuffle(others)
        for j in others:
            dot = float(projected.dot(flat[j]))
            if dot < 0 and sq_norms[j] > 0:
                projected.sub_(flat[j], alpha=dot / sq_norms[j])
                conflicts += 1
        total.add_(projected)
    logs["conflicts"] = float(conflicts)
    offset, out = 0, []
    for p in params:
        out.append(total[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    _add_to_grad(params, out)
    return logs


def _backward_gradnorm(balancer: "Balancer", losses, params, shared, scale) -> dict[str, float]:
    names = balancer.names
    # The terms of this call; the weights of the others (a contrastive term of a micro-batch without a pair,
    # which would read as a loss of 0, or as an initial loss of 0 that every later ratio divides) stay put.
    present = [k for k, name in enumerate(names) if name in losses]
    if not present:
        raise ValueError(f"gradnorm balances the terms {names} but got none of them")
    shared = shared if shared is not None else [params[-1]]
    values = torch.tensor([float(losses[names[k]].detach()) for k in present], dtype=torch.float64)
    if balancer.initial_losses is None:
        balancer.initial_losses = [None] * len(names)
    for value, k in zip(values.tolist(), present):  # L_i(0): each term's first loss
        if balancer.initial_losses[k] is None:
            balancer.initial_losses[k] = value
    weights = balancer.log_weights.exp()
    used = weights.detach().clone()
    norms = torch.stack([
        torch.sqrt(sum((g.float() ** 2).sum() for g in _grads(scale * losses[names[k]], shared, retain_graph=True)))
        for k in present]).detach().to(device=weights.device, dtype=weights.dtype)  # the weights live on the CPU
    grad_norms = weights[present] * norms  # G_i = ||grad(w_i * L_i, shared)||, differentiable in w_i only
    initial = torch.tensor([balancer.initial_losses[k] for k in present], dtype=torch.float64)
    ratios = values / initial.clamp_min(EPS)
    relative = (ratios / ratios.mean().clamp_min(EPS)).to(weights.dtype)
    target = (grad_norms.mean() * relative ** balancer.alpha).detach()
    gradnorm_loss = (grad_norms - target).abs().sum()
    # An overflowing gradient (an fp16 step the loss scaler backs off from) makes a norm inf: its update would
    # turn the weights NaN for every later step. They are kept; the engine skips the step on its gradient norm.
    if bool(torch.isfinite(norms).all()):
        before = balancer.log_weights.detach().clone()
        balancer.optimizer.zero_grad(set_to_none=True)
        balancer.log_weights.grad, = torch.autograd.grad(gradnorm_loss, balancer.log_weights)
        balancer.optimizer.step()
        with torch.no_grad():
            absent = [k for k in range(len(names)) if k not in present]
            balancer.log_weights[absent] = before[absent]  # Adam's momentum would move them without a gradient
            # Rescale so sum(w) == the configured total: log w -= log(sum(w) / total), as a log-sum-exp, which
            # stays finite where a large gradnorm_lr drives a log weight past exp's range (fp64: about 709).
            balancer.log_weights.sub_(torch.logsumexp(balancer.log_weights, 0) - math.log(balancer.total_weight))
    _weighted_sum_backward(losses, {names[k]: float(used[k]) for k in present}, params, scale)
    logs = {f"weight/{name}": float(used[k]) for k, name in enumerate(names)}
    logs.update({f"grad_norm/{name}": math.nan for name in names})  # NaN for a term left out of this call
    logs.update({f"grad_norm/{names[k]}": float(grad_norms[j].detach()) for j, k in enumerate(present)})
    logs["gradnorm/loss"] = float(gradnorm_loss.detach())
    return logs


# The values of a step's calls that step_logs averages: PCGrad measures each micro-batch's gradients afresh.
AVERAGED = ("cos/", "conflicts")


def step_logs(calls: list[dict[str, float]]) -> dict[str, float]:
    """The balancing values of an optimizer step, from those of its ``Balancer.backward`` calls (one per
    micro-batch, in order): a key's NaN values (undefined in that call) are left out; of the others, PCGrad's
    ``cos/*`` and ``conflicts`` (``AVERAGED``) give their mean, every other key (the weights, GradNorm's
    ``grad_norm/*`` and ``gradnorm/loss``) its last value: the state of the step's last GradNorm update that
    defined it. A key no call defined is NaN. One call gives its own values."""
    out = {}
    for key in dict.fromkeys(key for call in calls for key in call):
        values = [call[key] for call in calls if key in call and not math.isnan(call[key])]
        if not values:
            out[key] = math.nan
        elif key.startswith(AVERAGED):
            out[key] = sum(values) / len(values)
        else:
            out[key] = values[-1]
    return out


METHODS: dict[str, Callable[..., dict[str, float]]] = {
    "none": _backward_none,
    "pcgrad": _backward_pcgrad,
    "gradnorm": _backward_gradnorm,
}


class Balancer:
    """Backward of several loss terms with one of ``METHODS``.

    Args:
        method: ``none``, ``pcgrad`` or ``gradnorm``.
        names: every term that can be active, e.g. ``["kd", "ce", "feature"]``; a call may give
            any subset (gradnorm then trains the weights of those given only).
        weights: configured weight per name (``>= 0``; ``> 0`` for gradnorm, where they are
            the initial values and their sum the total kept by renormalisation).
        alpha: gradnorm's asymmetry (restoring force towards equal training rates).
        lr: learning rate of gradnorm's Adam on the log-weights.
        seed: pcgrad's projection order; the same seed gives the same gradients.
    """

    def __init__(self, method: str, names: list[str], weights: dict[str, float], *, alpha: float = 1.5,
                 lr: float = 0.025, seed: int = 0):
        if method not in METHODS:
            raise ValueError(f"unknown gradient balancing method {method!r}; choose one of {sorted(METHODS)}")
        missing = [name for name in names if name not in weights]
        if missing:
            raise ValueError(f"no weight configured for loss terms {missing}")
        if method == "gradnorm" and any(not weights[name] > 0 for name in names):
            raise ValueError(f"gradnorm needs every loss weight > 0 (they are its initial values), got {weights}")
        if any(not weights[name] >= 0 for name in names):
            raise ValueError(f"loss weights must be >= 0, got {weights}")
        if lr <= 0:
            raise ValueError(f"gradnorm lr must be > 0, got {lr}")
        self.method, self.names, self.alpha, self.lr, self.seed = method, list(names), alpha, lr, seed
        self.weights = {name: float(weights[name]) for name in names}
        self.total_weight = sum(self.weights.values())
        self.calls = 0
        self.initial_losses: list[float] | None = None
        self.log_weights = torch.tensor([math.log(self.weights[n]) if self.weights[n] > 0 else 0.0 for n in names],
                                        dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.log_weights], lr=lr)

    def current_weights(self) -> dict[str, float]:
        """The weights the next call uses (gradnorm's trained ones, else the configured)."""
        if self.method == "gradnorm":
            return {name: float(w) for name, w in zip(self.names, self.log_weights.detach().exp())}
        return dict(self.weights)

    def backward(self, losses: dict[str, torch.Tensor], params: list[torch.Tensor],
                 shared: list[torch.Tensor] | None = None, scale: float = 1.0) -> dict[str, float]:
        """Add the balanced gradient of ``scale * losses`` to ``p.grad`` of ``params``.

        Args:
            losses: raw (unweighted) scalar loss per active term, graphs on ``params``.
            params: the trainable parameters that receive gradient.
            shared: gradnorm's shared layer (default: ``params[-1]``); unused otherwise.
            scale: multiplies every loss, e.g. ``1 / tokens_in_step``.
        Returns:
            Values to log: ``weight/<name>``; pcgrad adds ``cos/<a>_<b>`` (NaN where a term has no
            gradient) and ``conflicts``, gradnorm ``grad_norm/<name>`` (NaN for a term not given) and
            ``gradnorm/loss``. ``step_logs`` folds a step's calls into its values.
        """
        unknown = [name for name in losses if name not in self.weights]
        if unknown:
            raise ValueError(f"loss terms {unknown} are not among the balanced terms {self.names}")
        losses = {name: losses[name] for name in self.names if name in losses}
        params = [p for p in params if p.requires_grad]
        logs = METHODS[self.method](self, losses, params, shared, scale)
        self.calls += 1
        return logs

    def state_dict(self) -> dict:
        return {"method": self.method, "names": list(self.names), "calls": self.calls, "seed": self.seed,
                "initial_losses": None if self.initial_losses is None else list(self.initial_losses),
                "log_weights": self.log_weights.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method or state["names"] != self.names:
            raise ValueError(f"the checkpoint balanced {state['names']} with {state['method']!r}, this run "
                             f"{self.names} with {self.method!r}; resume with the same settings")
        self.calls, self.seed = state["calls"], state["seed"]
        self.initial_losses = None if state["initial_losses"] is None else list(state["initial_losses"])
        with torch.no_grad():
            self.log_weights.copy_(state["log_weights"])
        self.optimizer.load_state_dict(state["optimizer"])
