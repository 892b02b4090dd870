"""The truncated prior replayed as CUDA graphs: one launch per branch instead of thousands.

An eager loss step of ADM-256 issues a few thousand kernels, and the device waits while the CPU
issues them, most where kernels are short (small batches, the semantic term alone). A CUDA
graph replays the captured kernels with one launch. The prior is frozen and a training run
feeds it few input shapes, which is what a graph needs.

For one input shape, ``PriorGraphs`` holds the no-grad forward (the ground-truth branch, and
any call without autograd) and *differentiable instances*: each is the forward and the backward
of the restored branch, captured together into a memory pool of its own (the recipe of
``torch.cuda.make_graphed_callables``, written out so that every output is a copy that later
replays cannot change). A forward takes an idle instance and holds it until its backward has
run, or until the autograd graph that would have run it is freed; so several forwards before
one backward (a multi-stage network's outputs, gradient accumulation) each replay their own
instance. Each instance's pool holds one restored branch's activations, as an eager forward
awaiting its backward does; pools stay reserved between steps. At most ``MAX_IN_FLIGHT``
instances per shape and ``MAX_SHAPES`` shapes are kept: a call beyond them runs eagerly.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.autograd.function import once_differentiable

WARMUP = 3  # eager runs before capture: cuDNN/cuBLAS handles, Triton compilation
MAX_IN_FLIGHT = 4  # differentiable instances per input shape (forwards awaiting backward)
MAX_SHAPES = 4  # input shapes with graphs; the least recently used idle one gives way


def _present(outputs) -> list[torch.Tensor]:
    return [o for o in outputs if o is not None]


def _like(template, tensors) -> tuple:
    """``tensors`` placed where ``template`` has a tensor; None elsewhere (no decoder)."""
    rest = iter(tensors)
    return tuple(None if o is None else next(rest) for o in template)


class CudaGraphCapture:
    """One callable captured as a CUDA graph; ``replay()`` reruns its kernels on the same
    memory and returns the same output tensors, now holding the new values."""

    @staticmethod
    def check_device(device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")

    @staticmethod
    def new_pool():
        return torch.cuda.graph_pool_handle()

    @staticmethod
    def warm_up(fn) -> None:
        """Run ``fn`` a few times on a side stream before capture, as capture requires."""
        torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(WARMUP):
                fn()
        torch.cuda.synchronize()

    def __init__(self, fn, pool=None):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn()

    def replay(self):
        self.graph.replay()
        return self.outputs


# What captures the graphs: tests on machines without CUDA put a stand-in here that reruns the
# callable eagerly, to exercise the bookkeeping around it.
CAPTURE = CudaGraphCapture


class _Instance:
    """One differentiable capture of ``net(x, t)``: its static input, forward and backward.

    ``generation`` counts the forwards replayed; a backward is valid only for the latest one,
    whose activations the pool still holds. ``busy`` is set from a forward until its backward
    ran or its autograd graph was freed."""

    def __init__(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, capture):
        self.x = torch.empty_like(x).copy_(x.detach()).requires_grad_(True)
        self.t = t.clone()
        self.generation, self.busy = 0, False

        def forward_and_backward():
            outs = _present(net(self.x, self.t))
            torch.autograd.grad(outs, self.x, [torch.zeros_like(o) for o in outs])

        capture.warm_up(forward_and_backward)
        pool = capture.new_pool()
        self._forward = capture(lambda: net(self.x, self.t), pool)
        self.outs = self._forward.outputs
        self.grads = [torch.empty_like(o) for o in _present(self.outs)]
        self._backward = capture(
            lambda: torch.autograd.grad(_present(self.outs), self.x, self.grads), pool)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            self.x.copy_(x)
            self.t.copy_(t)
        self.outs = self._forward.replay()
        self.generation += 1
        self.busy = True
        return [o.clone() for o in _present(self.outs)]

    def backward(self, grads) -> torch.Tensor:
        for static, grad in zip(self.grads, grads):
            if grad is None:
                static.zero_()
            else:
                static.copy_(grad)
        (dx,) = self._backward.replay()
        return dx.clone()

    def release(self, generation: int) -> None:
        if generation == self.generation:
            self.busy = False


class PriorGraphs:
    """The CUDA graphs of ``net(x, t)`` for inputs shaped like ``x`` and ``t``, captured on
    first use. Replays read copies of the inputs and return copies of the outputs."""

    def __init__(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, capture=None):
        self.capture = capture or CAPTURE
        self.capture.check_device(x.device)
        self.net = net
        self.x = torch.empty_like(x).copy_(x.detach())  # keeps x's layout; real values
        self.t = t.clone()
        self.instances: list[_Instance] = []
        self._no_grad = None

    @property
    def idle(self) -> bool:
        return not any(i.busy for i in self.instances)

    def no_grad(self, x: torch.Tensor, t: torch.Tensor) -> tuple:
        """``net(x, t)`` under no_grad, replayed."""
        if self._no_grad is None:
            def run():
                with torch.no_grad():
                    return self.net(self.x, self.t)
            self.capture.warm_up(run)
            self._no_grad = self.capture(run, self.capture.new_pool())
        with torch.no_grad():
            self.x.copy_(x)
            self.t.copy_(t)
        outs = self._no_grad.replay()
        return tuple(None if o is None else o.clone() for o in outs)

    def differentiable(self, x: torch.Tensor, t: torch.Tensor) -> tuple | None:
        """``net(x, t)`` differentiable to x, on an idle instance (captured when none is
        idle); None when ``MAX_IN_FLIGHT`` forwards already await their backward."""
        instance = next((i for i in self.instances if not i.busy), None)
        if instance is None:
            if len(self.instances) >= MAX_IN_FLIGHT:
                return None
            instance = _Instance(self.net, self.x, self.t, self.capture)
            self.instances.append(instance)
        outs = _GraphedBranch.apply(instance, x, t)
        return _like(instance.outs, outs)


class _Lease:
    """Held by the autograd node of one replayed forward: when the node is freed without a
    backward (the loss was never differentiated), the instance becomes idle again."""

    def __init__(self, instance: _Instance):
        self.generation = instance.generation
        weakref.finalize(self, instance.release, self.generation)


class _GraphedBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, instance: _Instance, x, t):
        outs = instance.forward(x, t)
        ctx.instance, ctx.lease = instance, _Lease(instance)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        instance, generation = ctx.instance, ctx.lease.generation
        if generation != instance.generation:
            raise RuntimeError(
                "cuda_graph: this loss's graph was replayed by a later forward before this "
                "backward, so its activations are gone; call backward once per forward")
        dx = instance.backward(grads)
        instance.release(generation)
        return None, dx, None


class GraphCache:
    """``PriorGraphs`` per network and input shape, at most ``MAX_SHAPES`` of them."""

    def __init__(self):
        self._graphs: dict[tuple, PriorGraphs] = {}
        self._warned = False

    def __len__(self) -> int:
        return len(self._graphs)

    def _get(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> PriorGraphs | None:
        key = (id(net), tuple(x.shape), x.stride(), x.dtype, x.device, tuple(t.shape))
        graphs = self._graphs.pop(key, None)
        if graphs is None:
            if len(self._graphs) >= MAX_SHAPES:
                oldest = next((k for k, g in self._graphs.items() if g.idle), None)
                if oldest is None:
                    return None
                del self._graphs[oldest]
            graphs = PriorGraphs(net, x, t)
        self._graphs[key] = graphs  # most recently used last
        return graphs

    def drop_unless(self, live: list[nn.Module]) -> None:
        """Forget the graphs of networks no longer in use (a network's graphs go with it)."""
        self._graphs = {k: g for k, g in self._graphs.items() if any(g.net is n for n in live)}

    def run(self, net: nn.Module, xt_gt: torch.Tensor, xt_res: torch.Tensor, t: torch.Tensor):
        """``(eps_gt, h_gt, eps_res, h_res)``: both branches replayed, or run eagerly when the
        limits above are reached."""
        graphs = self._get(net, xt_res, t)
        differentiable = torch.is_grad_enabled() and xt_res.requires_grad
        res = None
        if graphs is not None:
            res = graphs.differentiable(xt_res, t) if differentiable else graphs.no_grad(xt_res, t)
        if res is None:
            self._warn_eager()
            with torch.no_grad():
                gt = net(xt_gt, t)
            return (*gt, *net(xt_res, t))
        return (*graphs.no_grad(xt_gt, t), *res)

    def _warn_eager(self) -> None:
        if not self._warned:
            import warnings
            warnings.warn(f"cuda_graph: more than {MAX_IN_FLIGHT} forwards awaiting their "
                          f"backward, or more than {MAX_SHAPES} input shapes in use: this call "
                          "runs eagerly (same result, without graphs)", stacklevel=4)
            self._warned = True
