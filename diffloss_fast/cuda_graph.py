"""The truncated prior replayed as CUDA graphs: one launch per branch instead of thousands.

An eager loss step of ADM-256 issues a few thousand kernels, and the device waits while the CPU
issues them, most where kernels are short (small batches, the semantic term alone). A CUDA
graph replays the captured kernels with one launch. The prior is frozen and a training run
feeds it few input shapes, which is what a graph needs.

For one input shape, ``PriorGraphs`` holds the no-grad forward (the ground-truth branch, and
any call without autograd) and *differentiable instances*: each is the forward and the backward
of the pass that autograd differentiates (the restored branch, or the (target, difference)
pair pass, differentiable to the difference), captured together into a memory pool of its own (the recipe of
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


def _static(inputs: tuple, grad_index: int | None) -> tuple:
    """Static copies of ``inputs`` (their layouts and values), the one at ``grad_index``
    differentiable."""
    out = [torch.empty_like(x).copy_(x.detach()) for x in inputs]
    if grad_index is not None:
        out[grad_index].requires_grad_(True)
    return tuple(out)


def _load(static: tuple, inputs: tuple) -> None:
    with torch.no_grad():
        for s, x in zip(static, inputs):
            s.copy_(x)


class _Instance:
    """One differentiable capture of ``net(*inputs)``, differentiable to ``inputs[grad_index]``:
    its static inputs, forward and backward.

    ``generation`` counts the forwards replayed; a backward is valid only for the latest one,
    whose activations the pool still holds. ``busy`` is set from a forward until its backward
    ran or its autograd graph was freed."""

    def __init__(self, net: nn.Module, inputs: tuple, grad_index: int, capture):
        self.inputs = _static(inputs, grad_index)
        x = self.inputs[grad_index]
        self.generation, self.busy = 0, False

        def forward_and_backward():
            outs = _present(net(*self.inputs))
            torch.autograd.grad(outs, x, [torch.zeros_like(o) for o in outs])

        capture.warm_up(forward_and_backward)
        pool = capture.new_pool()
        self._forward = capture(lambda: net(*self.inputs), pool)
        self.outs = self._forward.outputs
        self.grads = [torch.empty_like(o) for o in _present(self.outs)]
        self._backward = capture(
            lambda: torch.autograd.grad(_present(self.outs), x, self.grads), pool)

    def forward(self, inputs: tuple) -> list[torch.Tensor]:
        _load(self.inputs, inputs)
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
    """The CUDA graphs of ``net(*inputs)`` for inputs shaped like ``inputs``, differentiable
    to ``inputs[grad_index]``, captured on first use. Replays read copies of the inputs and
    return copies of the outputs."""

    def __init__(self, net: nn.Module, inputs: tuple, grad_index: int, capture=None):
        self.capture = capture or CAPTURE
        self.capture.check_device(inputs[0].device)
        self.net, self.grad_index = net, grad_index
        self.inputs = _static(inputs, None)
        self.instances: list[_Instance] = []
        self._no_grad = None

    @property
    def idle(self) -> bool:
        return not any(i.busy for i in self.instances)

    def no_grad(self, inputs: tuple) -> tuple:
        """``net(*inputs)`` under no_grad, replayed."""
        if self._no_grad is None:
            def run():
                with torch.no_grad():
                    return self.net(*self.inputs)
            self.capture.warm_up(run)
            self._no_grad = self.capture(run, self.capture.new_pool())
        _load(self.inputs, inputs)
        outs = self._no_grad.replay()
        return tuple(None if o is None else o.clone() for o in outs)

    def differentiable(self, inputs: tuple) -> tuple | None:
        """``net(*inputs)`` differentiable to ``inputs[grad_index]``, on an idle instance
        (captured when none is idle); None when ``MAX_IN_FLIGHT`` forwards already await
        their backward."""
        instance = next((i for i in self.instances if not i.busy), None)
        if instance is None:
            if len(self.instances) >= MAX_IN_FLIGHT:
                return None
            instance = _Instance(self.net, self.inputs, self.grad_index, self.capture)
            self.instances.append(instance)
        x = inputs[self.grad_index]
        outs = _GraphedBranch.apply(instance, x, inputs)
        return _like(instance.outs, outs)


class _Lease:
    """Held by the autograd node of one replayed forward: when the node is freed without a
    backward (the loss was never differentiated), the instance becomes idle again."""

    def __init__(self, instance: _Instance):
        self.generation = instance.generation
        weakref.finalize(self, instance.release, self.generation)


class _GraphedBranch(torch.autograd.Function):
    """The replayed forward of one instance; ``x`` is the differentiable input (also inside
    ``inputs``, passed apart so that autograd sees it)."""

    @staticmethod
    def forward(ctx, instance: _Instance, x, inputs: tuple):
        outs = instance.forward(inputs)
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

    def _get(self, net: nn.Module, inputs: tuple, grad_index: int) -> PriorGraphs | None:
        key = (id(net), grad_index,
               *((tuple(x.shape), x.stride(), x.dtype, x.device) for x in inputs))
        graphs = self._graphs.pop(key, None)
        if graphs is None:
            if len(self._graphs) >= MAX_SHAPES:
                oldest = next((k for k, g in self._graphs.items() if g.idle), None)
                if oldest is None:
                    return None
                del self._graphs[oldest]
            graphs = PriorGraphs(net, inputs, grad_index)
        self._graphs[key] = graphs  # most recently used last
        return graphs

    def drop_unless(self, live: list[nn.Module]) -> None:
        """Forget the graphs of networks no longer in use (a network's graphs go with it)."""
        self._graphs = {k: g for k, g in self._graphs.items() if any(g.net is n for n in live)}

    def _replay(self, net: nn.Module, inputs: tuple, grad_index: int):
        """``(graphs, net(*inputs))`` replayed, differentiable to ``inputs[grad_index]`` when
        autograd wants it; ``(None, None)`` when the limits above are reached."""
        graphs = self._get(net, inputs, grad_index)
        if graphs is None:
            return None, None
        x = inputs[grad_index]
        if torch.is_grad_enabled() and x.requires_grad:
            return graphs, graphs.differentiable(inputs)
        return graphs, graphs.no_grad(inputs)

    def run(self, net: nn.Module, xt_gt: torch.Tensor, xt_res: torch.Tensor, t: torch.Tensor):
        """Two passes: ``(eps_gt, h_gt, eps_res, h_res)``, both branches replayed, or run
        eagerly when the limits above are reached."""
        graphs, res = self._replay(net, (xt_res, t), 0)
        if res is None:
            self._warn_eager()
            with torch.no_grad():
                gt = net(xt_gt, t)
            return (*gt, *net(xt_res, t))
        return (*graphs.no_grad((xt_gt, t)), *res)

    def run_difference(self, net: nn.Module, a: torch.Tensor, d: torch.Tensor,
                       t: torch.Tensor, d_scale: torch.Tensor):
        """A (target, difference) pass: ``(d_eps, d_h)``, replayed, or run eagerly when the
        limits above are reached."""
        _, out = self._replay(net, (a, d, t, d_scale), 1)
        if out is None:
            self._warn_eager()
            return net(a, d, t, d_scale)
        return out

    def _warn_eager(self) -> None:
        if not self._warned:
            import warnings
            warnings.warn(f"cuda_graph: more than {MAX_IN_FLIGHT} forwards awaiting their "
                          f"backward, or more than {MAX_SHAPES} input shapes in use: this call "
                          "runs eagerly (same result, without graphs)", stacklevel=4)
            self._warned = True
