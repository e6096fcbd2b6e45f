# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
One decode step of `MesaForCausalLM` (one new token per sequence, from a cache) captured in a CUDA graph and
replayed per token: the host launches one graph instead of every kernel of every layer.

`MesaConfig(decode_cuda_graph=True)` makes `generate()` use it; `MesaDecodeGraph` is the helper underneath.
"""

from __future__ import annotations

import weakref

import torch

from fla.models.utils import Cache, LegacyFLACache


def _tensors(state):
    """The tensors of one layer's cache state (a dict of tensors and tuples of tensors), in a fixed order."""
    out = []
    for key in ('recurrent_state', 'conv_state'):
        value = state.get(key)
        for t in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def _rebind(state, tensors):
    """`state` with its tensors replaced, in `_tensors`' order, by `tensors` (the same structure)."""
    it = iter(tensors)
    new = dict(state)
    for key in ('recurrent_state', 'conv_state'):
        value = state.get(key)
        if isinstance(value, (tuple, list)):
            new[key] = type(value)(next(it) if isinstance(t, torch.Tensor) else t for t in value)
        elif isinstance(value, torch.Tensor):
            new[key] = next(it)
    return new


def parameters_key(model) -> tuple:
    """What a captured step depends on besides its buffers: every parameter's and buffer's storage and dtype."""
    return tuple((t.data_ptr(), t.dtype) for t in (*model.parameters(), *model.buffers()))


def _layer_states(cache) -> list[dict]:
    return [cache[i] for i in range(len(cache))]


def _set_layer_state(cache, i, state):
    # fla's legacy cache keeps the layers' states in a list; its Cache on each layer object
    if isinstance(cache, LegacyFLACache):
        cache.states[i] = state
    else:
        cache.layers[i].state = state


class MesaDecodeGraph:
    """
    The decode step of `model` at one batch size: static buffers for the input ids, the logits and every layer's
    state (the recurrent `(h_kk, h_kv)` and the short convolutions' windows). A cache handed to `step` adopts the
    state buffers (its states are copied in once, then the cache's layers hold the buffers themselves), so that
    every replay advances that cache in place; a cache adopted before is handed back its own copy first.

    The step is the model's eager forward on the buffers, followed by copies of the new states into the buffers
    (the layer returns new state tensors). On a GPU (`capture=True`) it is captured once, after a few eager steps
    on a side stream (autotuning happens there), and replayed; with `capture=False` the same step runs eagerly
    (what CPU tests check: buffers, in-place state, logits equal to the plain eager step).

    Args:
        model (MesaForCausalLM):
            the model, in eval mode, without attention layers (their caches grow every token).
        cache (Cache):
            a cache after at least one token (a prefill): its layout and shapes set the buffers'. Its states are
            not changed here.
        capture (bool, Optional):
            capture a CUDA graph (needs CUDA tensors). Default: `True` on CUDA.
        warmup_steps (int, Optional):
            eager steps before the capture. Default: 2.
    """

    def __init__(self, model, cache, capture: bool | None = None, warmup_steps: int = 2):
        if model.training:
            raise ValueError("MesaDecodeGraph needs the model in eval mode (model.eval()), got training mode")
        if getattr(model.config, 'attn', None) is not None:
            raise ValueError(f"MesaDecodeGraph needs a model without attention layers (their caches grow every "
                             f"token), got config.attn = {model.config.attn!r}")
        if cache is None or len(cache) != model.config.num_hidden_layers or cache.get_seq_length() == 0:
            raise ValueError(f"MesaDecodeGraph needs a cache after a prefill, with one state per layer "
                             f"({model.config.num_hidden_layers}), got {None if cache is None else len(cache)} "
                             f"states and {0 if cache is None else cache.get_seq_length()} tokens")
        states = _layer_states(cache)
        first = _tensors(states[0])[0]
        capture = first.is_cuda if capture is None else capture
        if capture and not first.is_cuda:
            raise ValueError(f"capture=True needs the cache on a CUDA device, got {first.device}")
        self.model = model
        # a graph replays the storage it was captured on: a model whose parameters are replaced needs a new one
        self.parameters_key = parameters_key(model)
        self.capture = capture
        self.batch_size = first.shape[0]
        self.buffers = [[t.clone() for t in _tensors(s)] for s in states]
        # the cache the buffers run on: the model's forward reads and replaces its states; after each step its
        # layers are pointed back at the buffers
        self._cache = Cache.from_legacy_cache([_rebind(s, b) for s, b in zip(states, self.buffers)],
                                              seen_tokens=cache.get_seq_length())
        self.input_ids = torch.zeros(self.batch_size, 1, dtype=torch.long, device=first.device)
        self.logits = None
        self.graph = None
        self._owner = None
        if capture:
            self._capture(warmup_steps)

    def _step(self):
        """The step a graph captures: the forward on the buffers, new states copied into them."""
        with torch.no_grad():
            logits = self.model(input_ids=self.input_ids, past_key_values=self._cache, use_cache=True,
                                logits_to_keep=1, decode_graph=False).logits
            for i, buffers in enumerate(self.buffers):
                state = self._cache[i]
                for buffer, new in zip(buffers, _tensors(state)):
                    if new is not buffer:
                        buffer.copy_(new)
                _set_layer_state(self._cache, i, _rebind(state, buffers))
        if self.logits is None:
            self.logits = logits
        elif logits is not self.logits:
            self.logits.copy_(logits)
        return self.logits

    def _capture(self, warmup_steps):
        saved = [[b.clone() for b in buffers] for buffers in self.buffers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.logits = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        # the warm-up steps advanced the buffers: back to the cache's states
        for buffers, copies in zip(self.buffers, saved):
            for b, c in zip(buffers, copies):
                b.copy_(c)

    def owns(self, cache) -> bool:
        """Whether `cache`'s layers hold the buffers (adopted, and no other cache adopted since)."""
        return self._owner is not None and self._owner() is cache

    def adopt(self, cache):
        """Points `cache`'s layers at the buffers (its states copied in); the previous owner gets its own copy back."""
        if self.owns(cache):
            return
        states = _layer_states(cache)
        if len(states) != len(self.buffers):
            raise ValueError(f"cache has {len(states)} layer states, the graph {len(self.buffers)}")
        previous = self._owner() if self._owner is not None else None
        if previous is not None:
            for i, buffers in enumerate(self.buffers):
                _set_layer_state(previous, i, _rebind(previous[i], [b.clone() for b in buffers]))
        for i, (state, buffers) in enumerate(zip(states, self.buffers)):
            tensors = _tensors(state)
            if [t.shape for t in tensors] != [b.shape for b in buffers]:
                raise ValueError(f"layer {i}: cache state shapes {[tuple(t.shape) for t in tensors]} differ from "
                                 f"the graph's {[tuple(b.shape) for b in buffers]} (another batch size?)")
            for b, t in zip(buffers, tensors):
                if t is not b:
                    b.copy_(t)
            _set_layer_state(cache, i, _rebind(state, buffers))
        self._owner = weakref.ref(cache)

    def step(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """
        Decodes `input_ids` `[B, 1]` from `cache` (adopted first if it is not yet); returns the logits `[B, 1,
        vocab]`, a new tensor, and advances the cache by one token.
        """
        if input_ids.shape != self.input_ids.shape:
            raise ValueError(f"input_ids must be of shape {tuple(self.input_ids.shape)}, got {tuple(input_ids.shape)}")
        self.adopt(cache)
        self.input_ids.copy_(input_ids)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        for i in range(len(self.buffers)):
            cache.update(layer_idx=i, offset=1)
        # a copy: the buffer is overwritten by the next replay
        return self.logits.clone()
