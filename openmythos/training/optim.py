"""Muon for hidden weight matrices, AdamW for everything else (the seed's recipe), as one torch Optimizer.

One line with the Trainer::

    trainer = Trainer(model=model, args=args, optimizers=(MuonAdamW.from_model(model, lr=3e-4), None), ...)
"""

import torch
from torch import nn
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from ..modeling_mythos import MythosTopkRouter

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Replicate
else:  # a torch build without torch.distributed has no sharded parameters
    DTensor = Replicate = None


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(muon, adamw_decay, adamw_no_decay) trainable parameters.

    Muon takes the 2-D weights of hidden ``nn.Linear`` layers (attention, dense FFN, shared experts, depth-wise LoRA
    projections excluded since they are raw parameters). AdamW takes embeddings and the head (which Muon's
    orthogonalised update does not suit), the router, the 3-D routed-expert tensors (torch's Muon is 2-D only),
    and every vector/scalar: norms, injection A/B, LoRA scales, halting. Vectors and scalars get no weight decay.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    excluded = {id(m.weight) for m in (output, inputs) if m is not None}
    excluded |= {id(m.weight) for m in model.modules() if isinstance(m, MythosTopkRouter)}
    muon_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in excluded}
    muon, decay, no_decay, seen = [], [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in muon_ids and param.ndim == 2:
            muon.append(param)
        elif param.ndim >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    return muon, decay, no_decay


class FullMatrixMuon(torch.optim.Muon):
    """``torch.optim.Muon`` that orthogonalises a sharded matrix whole, so FSDP2 training matches one process.

    Under FSDP2 a hidden matrix and its gradient are DTensors split by rows (``Shard(0)``). Newton-Schulz must see
    the whole matrix. torch's Muon runs its matmuls through DTensor, which keeps the math global but redistributes at
    every matmul of every iteration and sums bf16 partial products across ranks: on 2 processes its result differed
    from the unsharded one by up to 8 bf16 steps (0.0156 on entries of 0.4; docs/distributed.md). Here a sharded
    matrix's momentum is updated on the shards (elementwise), the update is all-gathered once per step,
    orthogonalised by every rank exactly as one process would (the same function on the same numbers), and each rank
    keeps its own rows. The Newton-Schulz compute is therefore not divided among ranks: each rank runs it on every
    full matrix. Plain tensors take torch's own step unchanged.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hidden = []
        for group in self.param_groups:
            for param in group["params"]:
                if DTensor is not None and isinstance(param, DTensor) and param.grad is not None:
                    self._sharded_step(param, group)
                    hidden.append((param, param.grad))
        try:
            for param, _ in hidden:  # torch's step skips parameters without a gradient
                param.grad = None
            super().step()
        finally:
            for param, grad in hidden:
                param.grad = grad
        return loss

    def _sharded_step(self, param: DTensor, group: dict):
        """torch's Muon update (momentum, Nesterov, Newton-Schulz, lr adjustment, decoupled weight decay) for one
        sharded matrix, with the orthogonalisation on the gathered update."""
        grad = param.grad
        if grad.is_sparse or torch.is_complex(param):
            raise RuntimeError("Muon does not support sparse gradients or complex parameters")
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - group["momentum"])
        update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        full = _zeropower_via_newtonschulz(update.full_tensor(), group["ns_coefficients"], group["ns_steps"],
                                           group["eps"])
        # the same matrix on every rank: marked replicated, redistributing to the parameter's placements keeps each
        # rank's rows without communicating
        ortho = DTensor.from_local(full, param.device_mesh, [Replicate()] * param.device_mesh.ndim,
                                   run_check=False).redistribute(param.device_mesh, param.placements)
        lr = group["lr"]
        param.mul_(1 - lr * group["weight_decay"])
        param.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the hidden matrices and ``torch.optim.AdamW`` on the rest, behind one interface.

    Works on FSDP2-sharded models (build it after ``apply_fsdp2``, or let Accelerate swap in the sharded parameters):
    Muon's step runs on each gathered matrix (:class:`FullMatrixMuon`), AdamW's on the shards.

    Its ``param_groups`` are the inner optimizers' own group dicts, so LR schedulers (and the Trainer's) drive both.
    Muon groups carry ``lr=muon_lr``; a scheduler scales each group's lr relative to its initial value.
    """

    def __init__(self, muon_params, adamw_params, adamw_no_decay_params=(), *, lr=3e-4, muon_lr=0.02,
                 weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, momentum=0.95):
        muon_params, adamw_params, adamw_no_decay_params = map(list, (muon_params, adamw_params,
                                                                      adamw_no_decay_params))
        if not (muon_params or adamw_params or adamw_no_decay_params):
            raise ValueError("MuonAdamW got no trainable parameters")
        self.muon = FullMatrixMuon(muon_params, lr=muon_lr, weight_decay=weight_decay, momentum=momentum) \
            if muon_params else None
        groups = [{"params": adamw_params, "weight_decay": weight_decay},
                  {"params": adamw_no_decay_params, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        self.adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps) if groups else None
        inner = [o for o in (self.muon, self.adamw) if o is not None]
        super().__init__([g for o in inner for g in o.param_groups], {})
        self._inner = inner

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs) -> "MuonAdamW":
        """Split ``model``'s trainable parameters with :func:`split_parameters` and build the optimizer."""
        return cls(*split_parameters(model), **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self._inner:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for optimizer in self._inner:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        """torch's usual layout over all parameter groups (Muon's, then AdamW's), so that tools which map optimizer
        state to parameter names by position read it: ``torch.distributed.checkpoint.state_dict``'s
        ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, which Accelerate uses for FSDP2 checkpoints."""
        return torch.optim.Optimizer.state_dict(self)

    def load_state_dict(self, state_dict):
        if "muon" in state_dict or "adamw" in state_dict:  # the earlier layout: one state dict per inner optimizer
            for name in ("muon", "adamw"):
                optimizer = getattr(self, name)
                if optimizer is not None and state_dict.get(name) is not None:
                    optimizer.load_state_dict(state_dict[name])
        else:
            groups = state_dict["param_groups"]
            if len(groups) != len(self.param_groups):
                raise ValueError(f"MuonAdamW.load_state_dict: the state dict has {len(groups)} parameter groups, this "
                                 f"optimizer {len(self.param_groups)}; it was saved from a different model or split")
            start = 0
            for optimizer in self._inner:
                # each inner optimizer maps saved keys to its parameters by position, whatever the keys are (indices,
                # or parameter names from torch.distributed.checkpoint)
                mine = groups[start:start + len(optimizer.param_groups)]
                start += len(mine)
                keys = {key for group in mine for key in group["params"]}
                optimizer.load_state_dict({"state": {k: v for k, v in state_dict["state"].items() if k in keys},
                                           "param_groups": mine})
        # inner load_state_dict replaces group dicts: share them again
        self.param_groups[:] = [g for o in self._inner for g in o.param_groups]

    @property
    def state(self):
        merged = {}
        for optimizer in getattr(self, "_inner", ()):
            merged.update(optimizer.state)
        return merged

    @state.setter
    def state(self, value):  # set by Optimizer.__init__; the inner optimizers own the real state
        pass
