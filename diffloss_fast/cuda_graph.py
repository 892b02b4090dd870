"""The truncated prior replayed as CUDA graphs: one launch per branch instead of thousands.

An eager loss step of ADM-256 issues a few thousand kernels. On an H200 the device sat idle for
12% of the fused-norm step at batch 8 (27 of 222 ms, run 5) while the CPU issued them, and
for more of it where the kernels are short (small batches, the semantic term alone). A CUDA
graph replays the captured kernels with one launch. The prior is frozen and a training run
feeds it one input shape, which is what a graph needs.

``PriorGraphs`` captures, for one input shape, the no-grad forward (the ground-truth branch)
and the forward and backward of the differentiable branch (the recipe of
``torch.cuda.make_graphed_callables``, written out so that every output is a copy that later
replays cannot change, and so that a backward whose graph was replayed since is refused rather
than fed another step's activations).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

WARMUP = 3  # eager runs before capture: cuDNN/cuBLAS handles, Triton compilation


def _present(outputs) -> list[torch.Tensor]:
    return [o for o in outputs if o is not None]


def _like(template, tensors) -> tuple:
    """``tensors`` placed where ``template`` has a tensor; None elsewhere (no decoder)."""
    rest = iter(tensors)
    return tuple(None if o is None else next(rest) for o in template)


class PriorGraphs:
    """The CUDA graphs of ``net(x, t)`` for inputs shaped like ``x`` and ``t``; each is captured
    on its first use. Replays read copies of the inputs and return copies of the outputs."""

    def __init__(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor):
        if x.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {x.device}")
        self.net = net
        self.x = torch.empty_like(x).copy_(x.detach())  # keeps x's layout; real values
        self.x_grad = self.x.clone().requires_grad_(True)
        self.t = t.clone()
        self.generation = 0  # replays of the differentiable forward so far
        self._no_grad = self._grad = None

    def _warm_up(self, differentiable: bool) -> None:
        torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(WARMUP):
                if differentiable:
                    outs = _present(self.net(self.x_grad, self.t))
                    torch.autograd.grad(outs, self.x_grad, [torch.zeros_like(o) for o in outs])
                else:
                    with torch.no_grad():
                        self.net(self.x, self.t)
        torch.cuda.synchronize()

    def _load(self, static: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> None:
        with torch.no_grad():
            static.copy_(x)
            self.t.copy_(t)

    def no_grad(self, x: torch.Tensor, t: torch.Tensor) -> tuple:
        """``net(x, t)`` under no_grad, replayed."""
        if self._no_grad is None:
            self._warm_up(differentiable=False)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                outs = self.net(self.x, self.t)
            self._no_grad = graph, outs
        graph, outs = self._no_grad
        self._load(self.x, x, t)
        graph.replay()
        return tuple(None if o is None else o.clone() for o in outs)

    def differentiable(self, x: torch.Tensor, t: torch.Tensor) -> tuple:
        """``net(x, t)`` differentiable to x: the forward graph now, the backward graph when
        autograd reaches it."""
        if self._grad is None:
            self._warm_up(differentiable=True)
            pool = torch.cuda.graph_pool_handle()
            forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(forward, pool=pool):
                outs = self.net(self.x_grad, self.t)
            grads = [torch.empty_like(o) for o in _present(outs)]
            with torch.cuda.graph(backward, pool=pool):
                (dx,) = torch.autograd.grad(_present(outs), self.x_grad, grads)
            self._grad = forward, backward, outs, grads, dx
        outs = _GraphedBranch.apply(self, x, t)
        return _like(self._grad[2], outs)


class _GraphedBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs: PriorGraphs, x, t):
        forward, _, outs, _, _ = graphs._grad
        graphs._load(graphs.x_grad, x, t)
        forward.replay()
        graphs.generation += 1
        ctx.graphs, ctx.generation = graphs, graphs.generation
        return tuple(o.clone() for o in _present(outs))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        graphs = ctx.graphs
        if ctx.generation != graphs.generation:
            raise RuntimeError(
                "cuda_graph=True: the prior's graph was replayed by a later forward before "
                "this backward, so this step's activations are gone; call backward after "
                "each forward (or use cuda_graph=False to accumulate several forwards)")
        _, backward, _, static_grads, dx = graphs._grad
        for static, grad in zip(static_grads, grads):
            if grad is None:
                static.zero_()
            else:
                static.copy_(grad)
        backward.replay()
        return None, dx.clone(), None
