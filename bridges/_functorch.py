"""torch.func support for bridged ops: derivative rules run as ops of their own (`RuleCall`),
which vmap can batch, and a vmapped op's per-sample rules gathered into one batched rule for a
derivative transform outside vmap (`per_sample_result`)."""
from __future__ import annotations

import torch

from ._errors import MissingDerivativeError
from ._transfer import conform, spec_of, to_tensor

ANY_LEVEL = "any"  # a batched rule's functorch level: any vmap may batch it


def in_functorch_transform() -> bool:
    """True inside a torch.func transform, including its lowered call of a Function's forward."""
    return (torch._C._functorch.maybe_current_level() is not None
            or torch._C._functorch.get_single_level_autograd_function_allowed())


class RuleCall(torch.autograd.Function):
    """Runs a pullback or pushforward as an op of its own, so vmap can batch it (torch.func.jacrev,
    jacfwd) and a second derivative fails naming the op. Used only under create_graph or
    torch.func transforms; plain backward calls the rule directly."""

    @staticmethod
    def forward(name, rule, n_args, *tensors):
        # tensors = the rule's arguments + the op's inputs (anchors, so the results require grad
        # exactly when a true second derivative would exist)
        return rule(*tensors[:n_args])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op_name = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        raise MissingDerivativeError(
            f"double backward through '{ctx.op_name}' is not supported: its foreign derivative "
            f"rule has no derivative of its own. Differentiate only once (no create_graph=True, "
            f"no nested torch.func.grad/hessian through this op)")

    jvp = backward  # forward mode over a derivative rule (e.g. torch.func.hessian) is the same

    @staticmethod
    def vmap(info, in_dims, name, rule, n_args, *tensors):
        # one call with every sample's cotangents; a rule made for one vmap's samples (`level`,
        # see per_sample_rule) only at that vmap, below whichever others batch its inputs
        level = getattr(rule, "level", ANY_LEVEL)
        if getattr(rule, "batched", False) and level in (
                ANY_LEVEL, torch._C._functorch.maybe_current_level()):
            size = info.batch_size
            cotangents = [t if t is None else t.expand(size, *t.shape) if d is None else
                          t.movedim(d, 0)
                          for t, d in zip(tensors[:n_args], in_dims[3:3 + n_args])]
            out = rule(*cotangents, batch=size)
            return out, tuple(None if o is None else 0 for o in out)
        per_sample = [RuleCall.apply(name, rule, n_args, *select(tensors, in_dims[3:], b))
                      for b in range(info.batch_size)]
        out = tuple(None if per_sample[0][i] is None else torch.stack([s[i] for s in per_sample])
                    for i in range(len(per_sample[0])))
        return out, tuple(None if o is None else 0 for o in out)


def select(args, in_dims, b):
    # (a non-tensor argument's in_dims mirrors its structure: an empty list's is [])
    return [a.select(d, b) if isinstance(d, int) else a for a, d in zip(args, in_dims)]


def per_sample_result(records, per_sample, outs, single, args, in_dims):
    """A vmapped op's (outputs, pullback[, pushforward]) for a derivative transform outside
    vmap, from its samples' `records` (their forward results) and outputs `per_sample`."""
    inputs = [select(args, in_dims, b) for b in range(len(records))]
    result = (outs, per_sample_rule([r[0][1] for r in records], inputs))
    if all(len(r[0]) == 3 and r[0][2] is not None for r in records):
        outputs = [(o,) if single else tuple(o) for o in per_sample]
        result += (per_sample_rule([r[0][2] for r in records], outputs),)
    return result


def per_sample_rule(rules, likes):
    """One batched derivative rule (see RuleCall.vmap) from the rules (pullbacks or
    pushforwards) of a vmapped op's samples: sample b's cotangents or tangents go to rules[b].
    likes[b][i]: what result i of sample b must look like (its zeros stand in for a None)."""
    def rule(*args, batched=True, **kwargs):
        per_sample = []
        for b, fn in enumerate(rules):
            out = fn(*[None if a is None else a[b] for a in args], **kwargs)
            per_sample.append(out if type(out) is tuple else tuple(out) if isinstance(
                out, list) else (out,))
        stacked = []
        for i, column in enumerate(zip(*per_sample)):
            if all(r is None for r in column) or not isinstance(likes[0][i], torch.Tensor):
                stacked.append(None if all(r is None for r in column) else column[0])
                continue
            what = lambda: f"result {i} of a sample's derivative rule"  # noqa: E731
            stacked.append(torch.stack([
                torch.zeros_like(likes[b][i]) if r is None else
                conform(to_tensor(r, what), spec_of(likes[b][i]), what)
                for b, r in enumerate(column)]))
        return tuple(stacked)
    rule.batched, rule.samples = True, len(rules)
    rule.level = torch._C._functorch.maybe_current_level()  # (that of the vmap's rule)
    return rule
