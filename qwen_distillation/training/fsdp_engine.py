"""The FSDP2 engine: the student and the frozen teacher sharded over the ranks with PyTorch's
``fully_shard``, behind the engine interface of ``training/engine.py``.

What it keeps from the single-device engine, so a stage computes the same thing on one process or
many: the client ``torch.optim.AdamW`` and LambdaLR schedule (``training.optim``), fp32 master
weights with the forward under the distiller's ``torch.autocast`` (no FSDP ``MixedPrecisionPolicy``:
weights are gathered and gradients reduced in fp32), the per-token normalisation over the whole
step, clipping at ``stageN.max_grad_norm`` and the non-finite policy (a step with a non-finite loss
or gradient norm on any rank is skipped by every rank, and counted).

Units (:func:`shard_model`): every decoder layer is one unit, gathered while it runs and freed
after; the root unit holds the rest, the embedding, final norm and lm_head (tied or not), and for
the student the distillation heads too (the root is the ``DistillationModule``). The hidden-state
path (``modeling.capture.forward_captured``) calls the decoder stack directly and reads the lm_head
weight outside its module, so the root unit's hooks never run for it: the student's root is
gathered by the ``DistillationModule``'s own forward (which computes the loss terms, lm_head
included), and the teacher's root, and both roots for evaluation and generation, by
:func:`unsharded` (the engine's :meth:`FSDP2Engine.gathered`). A root stays gathered from its
forward to the end of its backward (FSDP2 never reshards a root after forward).

Gradient scaling: each rank's loss terms are its share of the step's per-token means
(:func:`training.module.per_step_mean` over the tokens of the *whole* step, all ranks); FSDP2
averages gradients over the ranks, so the loss is multiplied by the world size. Gradients are
reduce-scattered after every micro-batch and add up in the sharded ``.grad`` (correct for any
accumulation; a step could skip the reductions of all but its last micro-batch with
``set_requires_gradient_sync``, at the cost of a whole-size gradient per rank).
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from qwen_distillation.errors import CheckpointError
from qwen_distillation.modeling.parts import decoder_and_head
from qwen_distillation.training.distributed import ALL_RANKS, Topology, all_reduce_sum
from qwen_distillation.training.engine import ConsolidatedExports, StepOutcome, other_engine, weighted_loss

log = logging.getLogger(__name__)

FSDP_DIR = "fsdp"  # the distributed checkpoint (torch.distributed.checkpoint) inside stageN/checkpoint-STEP


def device_mesh(topo: Topology, device_type: str):
    """The one-dimensional mesh of the launch's ranks that every unit is sharded over."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (topo.world_size,))


def shard_model(model: nn.Module, mesh, *, device: torch.device, root: nn.Module | None = None,
                name: str = "model") -> nn.Module:
    """Shard ``model`` (a causal LM, also under a peft wrapper) over ``mesh``: one unit per decoder
    layer, then the root unit ``root`` (``model`` itself by default, or a module holding it) for the
    parameters left. Returns the root, ready to run (see the module docstring).

    The weights are rank 0's: it holds ``root`` whole in CPU memory, the other ranks hold it on the
    meta device (``modeling.pair.build_pair``, ``placement``), so that only rank 0 ever holds a whole
    model, the way accelerate's ``cpu_ram_efficient_loading`` and torchtitan start. Every rank
    shards its model (rank 0's shards go to ``device`` unit by unit, the others' stay on the meta
    device and are then allocated there); rank 0 broadcasts its weights one tensor at a time into
    every rank's shards (torch.distributed.checkpoint's ``set_model_state_dict`` with
    ``broadcast_from_rank0``), and then its buffers, which the state dict leaves out (the rotary
    ``inv_freq``). Tied weights stay one parameter throughout (from_config ties them on the meta
    device too). A collective: every rank calls it; a log line names the model (``name``) and the
    parameters the rank held before.

    The root is initialised here rather than at its first forward, as FSDP2 would: the evaluation
    before the first step runs the decoder layers without the root's forward, and the first unit
    to run would otherwise take itself for the root (and keep its layer gathered after forward)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    root = model if root is None else root
    held = sum(p.numel() for p in model.parameters() if p.device.type != "meta")
    total = sum(p.numel() for p in model.parameters())
    main = dist.get_rank() == 0
    weights = root.state_dict() if main else {}
    for layer in decoder_and_head(model)[0].layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    if not main:
        root.to_empty(device=device)
    set_model_state_dict(root, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del weights
    # Every entry (a shared buffer is one tensor on rank 0 but one per module after to_empty), in
    # the same order on every rank.
    for _, buffer in root.named_buffers(remove_duplicate=False):
        dist.broadcast(buffer, src=0)
    root._get_fsdp_state()._lazy_init()
    log.info("rank %d: %s sharded from rank 0's weights (%d of its %d parameters were in this rank's memory "
             "before)", dist.get_rank(), name, held, total, extra=ALL_RANKS)
    return root


@contextlib.contextmanager
def unsharded(modules: Iterable[nn.Module | None]):
    """Hold the own parameters of the FSDP2 ``modules`` (the roots: embedding, final norm, lm_head,
    heads) gathered for the block, and shard them again after it (a collective: every rank enters
    alike). Modules that are not sharded are skipped, so it is a no-op on one device."""
    from torch.distributed.fsdp import FSDPModule

    roots = [m for m in modules if isinstance(m, FSDPModule)]
    for root in roots:
        root.unshard()
    try:
        yield
    finally:
        for root in roots:
            root.reshard()


class FSDP2Engine(ConsolidatedExports):
    """Optimises ``module`` (``training.module.DistillationModule``, already sharded by
    :func:`shard_model`) with FSDP2.

    Args:
        module: the trainable module, the student's root unit.
        optimizer, scheduler: the stage's client AdamW (over the sharded parameters) and schedule.
        weights: the weight of each loss term (``training.plan.loss_weights``): the loss is their
            weighted sum (balancing is refused under FSDP2, see ``config.validate``).
        topology: this process's place in the launch.
        max_grad_norm: clip threshold; 0 disables clipping (the norm is still measured).
        gathered: other root units held gathered in :meth:`gathered` (the teacher's).
    """

    kind = "fsdp2"

    def __init__(self, module: nn.Module, *, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, weights: dict[str, float], topology: Topology,
                 max_grad_norm: float = 1.0, gathered: Iterable[nn.Module | None] = ()):
        self.module, self.optimizer, self.scheduler, self.weights = module, optimizer, scheduler, weights
        self.topo, self.max_grad_norm = topology, max_grad_norm
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.roots = [m for m in gathered if m is not None]
        self.bad_in_row = 0
        self.bad_total = 0
        self._nonfinite = ""

    def forward(self, *args):
        return self.module(*args)

    def gathered(self):
        """Hold the teacher's root unit gathered for a micro-batch: its lm_head weight is read by
        the student's loss, outside the teacher's modules."""
        return unsharded(self.roots)

    def backward(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Backpropagate this rank's share of one micro-batch's terms (see the module docstring).
        A non-finite term poisons the step's gradient, so every rank skips it at :meth:`step`;
        every rank runs all its micro-batches either way (the reductions are collective)."""
        loss, nonfinite = weighted_loss(terms, self.weights, self.topo.world_size)
        self._nonfinite = self._nonfinite or nonfinite
        loss.backward()
        return {}

    def step(self) -> StepOutcome:
        """Clip and apply the reduced gradient, or skip the step on every rank when any rank's loss
        or the global gradient norm is non-finite; advance the schedule, zero the gradients."""
        lr = self.scheduler.get_last_lr()[0]
        (bad_here,) = all_reduce_sum(self.topo, [1.0 if self._nonfinite else 0.0])
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, limit)  # a collective over the shards
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        skipped = bad_here > 0 or not math.isfinite(grad_norm)
        nonfinite = self._nonfinite
        if skipped and not nonfinite:
            nonfinite = "a non-finite loss on another rank" if bad_here else f"grad_norm={grad_norm}"
        if skipped:
            self.bad_in_row += 1
            self.bad_total += 1
            grad_norm = float("nan") if bad_here else grad_norm
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.bad_in_row = 0
        self.zero_grad()
        return StepOutcome(lr=lr, grad_norm=grad_norm, skipped=skipped, bad_in_row=self.bad_in_row,
                           bad_total=self.bad_total, nonfinite=nonfinite)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._nonfinite = ""

    # ------------------------------------------------------------------ state
    def save_state(self, directory: Path) -> dict:
        """Write every rank's shards of the module and optimizer state under ``directory/fsdp``
        (torch.distributed.checkpoint); returns the replicated rest (schedule, skip count)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / FSDP_DIR))
        # The parameters AdamW holds moments of: not those the stage does not train (a head
        # of a later stage), which the template of a load would otherwise ask the checkpoint for.
        return {"kind": self.kind, "scheduler": self.scheduler.state_dict(), "bad_total": self.bad_total,
                "optimizer_state": sorted(optimizer_state["state"])}

    def load_state(self, directory: Path, state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        kind = state.get("kind", "single-device")
        if kind != self.kind:
            raise other_engine(kind, self.kind)
        if not (directory / FSDP_DIR).is_dir():
            raise CheckpointError(f"{directory / FSDP_DIR}: missing, no FSDP2 state can be loaded")
        model_state, optimizer_state = get_state_dict(self.module, self.optimizer)
        saved = set(state["optimizer_state"])
        optimizer_state["state"] = {name: value for name, value in optimizer_state["state"].items() if name in saved}
        shards = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(shards, checkpoint_id=str(directory / FSDP_DIR))
        # Not strict: the parameters without AdamW moments stay without them, as in a run that was
        # never interrupted (the load above already failed on anything else the checkpoint lacks).
        set_state_dict(self.module, self.optimizer, model_state_dict=shards["model"],
                       optim_state_dict=shards["optimizer"], options=StateDictOptions(strict=False))
        self.scheduler.load_state_dict(state["scheduler"])
        self.bad_total = state["bad_total"]

    # ---------------------------------------------------------------- exports
    def _full_state(self, prefix: str) -> dict[str, torch.Tensor] | None:
        """The whole weights under ``prefix`` (``student.``, ``heads.``) in rank 0's CPU memory,
        None on the others (a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.topo.is_main:
            return None
        # A tied weight (lm_head = embedding) comes back under both names, as two copies that
        # save_pretrained cannot tell are one: keep the first name, as the module's own state dict does.
        first: dict[int, str] = {}
        tied = {name for name, p in self.module.named_parameters(remove_duplicate=False)
                if first.setdefault(id(p), name) != name}
        return {name[len(prefix):]: value for name, value in state.items()
                if name.startswith(prefix) and name not in tied}
