"""The Transformer Engine backend: an fp8lab.Linear whose GEMMs run in a ``te.Linear``.

Invariant: a layer builds one ``te.Linear`` per device, held by a ``TEHandle`` in the
layer's declared ``te_handle`` attribute (a plain attribute: not a registered submodule,
not a global), whose ``weight`` and ``bias`` ARE the layer's Parameters: state_dict keys,
the optimizer and ``.to()`` see one set of parameters, and TE's pickled ``_extra_state``
is never saved.

TE owns the scaling of these layers: it records amaxes and updates scales itself, on
its own schedule, never through ``fp8lab.update_scales`` (which leaves these layers'
``fp8_state`` alone: its ``owner`` is "te"). What that means:

- Forward scales/histories are updated when the outermost ``te.autocast`` region exits
  with grad enabled, grad_output's at the end of the backward of the region's first
  module. So every micro-batch updates them (fp8lab's once-per-optimizer-step rule does
  not apply), and so do evaluation forwards run with grad enabled.
- At each of those points TE updates *every* TE module of the process. A layer opens its
  own region when none is open, so with N TE layers each history rolls N times per step
  (N - 1 times with a zero row): scales still match TE's for "most_recent", and for
  "max" the window covers ~amax_history_len / N steps. Wrap the model's forward in
  ``fp8lab.gemm.backends.te.autocast(scaling)`` for TE's exact once-per-step cadence.
- ``layer.fp8_state`` is a mirror. ``sync_from_te`` copies TE's state into it
  (``TEBackend.scaling_view``, hence ``layer.scaling_view()``, does it for telemetry;
  ``state_dict()`` does it through a hook), and ``restore_te`` copies it back when the TE
  module is built and after ``load_state_dict``. Checkpoints stay plain tensors
  (``weights_only=True``).
- Per-cast statistics (overflow %, SQNR) do not exist: TE casts inside its kernels; the
  view reports them as NaN.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from fp8lab.gemm.backends.base import ScalingView, not_measured
from fp8lab.gemm.backends.select import probe_te
from fp8lab.gemm.backends.te_mapping import copy_into_te_meta_, make_te_recipe, te_meta_to_fp8lab
from fp8lab.gemm.hardware import BackendUnavailable
from fp8lab.scaling.delayed import DelayedScaling

TE_TOKEN_MULTIPLE = 16  # TE's FP8 GEMM wants the token count % 8 (its docs say 16): pad to 16


def _import_te() -> SimpleNamespace:
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe

        try:  # TE >= 2.8 keeps it here; transformer_engine.pytorch.fp8 is its deprecated alias
            from transformer_engine.pytorch.quantization import FP8GlobalStateManager
        except ImportError:
            from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    except Exception as exc:  # ImportError, OSError (missing .so), RuntimeError (CUDA/ABI)
        raise BackendUnavailable(
            f"backend 'te' needs `import transformer_engine.pytorch`, which failed: {exc}. "
            "Reinstall it for this torch (pip install 'fp8lab[te]') or use backend='scaled_mm'"
        ) from exc
    return SimpleNamespace(te=te, recipe_module=recipe, manager=FP8GlobalStateManager)


def te_recipe(scaling):
    """TE's recipe object equal to ``scaling`` (needs Transformer Engine; raises
    BackendUnavailable naming the TE version needed when the installed one lacks a part)."""
    return make_te_recipe(scaling, _import_te().recipe_module, probe_te().version or "unknown")


def _region(te, te_recipe_obj):
    if hasattr(te, "autocast"):  # TE >= 2.8
        return te.autocast(enabled=True, recipe=te_recipe_obj)
    return te.fp8_autocast(enabled=True, fp8_recipe=te_recipe_obj)


def autocast(scaling=None):
    """One TE FP8 region around a whole forward: TE's once-per-step scaling update.

    ``with fp8lab.gemm.backends.te.autocast(scaling): loss = model(x)``. Layers inside use
    this region's scaling (pass the one the layers were built with).
    """
    return _region(_import_te().te, te_recipe(scaling if scaling is not None else DelayedScaling()))


def _te_meta(te_module: nn.Module) -> dict:
    meta = te_module.fp8_meta
    if "scaling_fwd" not in meta or "scaling_bwd" not in meta:
        raise RuntimeError("Transformer Engine has not created this module's FP8 scaling state yet")
    return {key: (meta[key].amax_history, meta[key].scale) for key in ("scaling_fwd", "scaling_bwd")}


def read_te_scaling(te_module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax_history [H, 3], scale [3]) of a TE module, columns input, weight, grad_output."""
    return te_meta_to_fp8lab(_te_meta(te_module))


@dataclass
class TEHandle:
    """One layer's Transformer Engine module, kept in ``layer.te_handle``."""

    te: SimpleNamespace  # the imported TE modules (``_import_te``)
    module: nn.Module  # the te.Linear, sharing the layer's Parameters
    te_recipe: object  # TE's DelayedScaling recipe for this layer
    device: torch.device
    warned: bool = False  # the "own te.autocast region" warning was given


@torch.no_grad()
def sync_from_te(layer: nn.Module) -> None:
    """Copy TE's scaling state into ``layer.fp8_state`` (no-op before TE ran the layer)."""
    handle = layer.te_handle
    if handle is None or layer.fp8_state is None:  # only delayed scaling has state to mirror
        return
    history, scale = read_te_scaling(handle.module)
    state = layer.fp8_state
    if history.shape != state.amax_history.shape:
        raise ValueError(
            f"TE's amax history is {tuple(history.shape)} but fp8_state's is "
            f"{tuple(state.amax_history.shape)}: the te.autocast scaling differs from the layer's"
        )
    state.amax_history.copy_(history)
    state.scale.copy_(scale)


@torch.no_grad()
def restore_te(layer: nn.Module) -> None:
    """Copy ``layer.fp8_state`` into TE's scaling state (e.g. after loading a checkpoint)."""
    handle = layer.te_handle
    if handle is not None and layer.fp8_state is not None:
        state = layer.fp8_state
        copy_into_te_meta_(state.amax_history, state.scale, _te_meta(handle.module))


def sync_te_scaling(model: nn.Module) -> None:
    """``sync_from_te`` for every TE-backed layer of ``model`` (call before reading fp8_state)."""
    for module in model.modules():
        if getattr(module, "te_handle", None) is not None:
            sync_from_te(module)


def _sync_hook(module, prefix, keep_vars) -> None:
    sync_from_te(module)


def _restore_hook(module, incompatible_keys) -> None:
    restore_te(module)


def _build(layer: nn.Module) -> TEHandle:
    lib = _import_te()
    device = layer.weight.device
    layer_te_recipe = te_recipe(layer.fp8.scaling)
    with torch.cuda.device(device):  # TE allocates its scaling state on the current device
        module = lib.te.Linear(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            params_dtype=layer.weight.dtype,  # float32 master weights
            device=device,
        )
        module.weight = layer.weight  # share, not copy: TE reads self.weight at every forward
        if layer.bias is not None:
            module.bias = layer.bias
        # TE creates its scaling tensors at the first FP8 forward; create them now so a
        # checkpoint's state is in place before TE's first cast. Under no_grad the
        # region's exit updates no scales. (Only delayed scaling keeps such state.)
        if layer.fp8_state is not None:
            with torch.no_grad(), _region(lib.te, layer_te_recipe):
                module.init_fp8_metadata(num_gemms=1)
    return TEHandle(lib, module, layer_te_recipe, device)


def ensure_handle(layer: nn.Module) -> TEHandle:
    """``layer.te_handle``, built (or rebuilt on a new device) and in step with the layer."""
    handle = layer.te_handle
    if handle is not None and handle.device == layer.weight.device:
        if handle.module.weight is not layer.weight:  # parameters were reassigned (tying, FSDP)
            handle.module.weight = layer.weight
        if layer.bias is not None and handle.module.bias is not layer.bias:
            handle.module.bias = layer.bias
        return handle
    if handle is not None:  # the layer moved device: carry TE's state over via fp8_state
        sync_from_te(layer)
    else:
        layer.register_state_dict_pre_hook(_sync_hook)
        layer.register_load_state_dict_post_hook(_restore_hook)
    layer.te_handle = handle = _build(layer)
    if layer.fp8_state is not None:
        layer.fp8_state.owner = "te"  # a mirror of TE's state from now on: update_scales skips it
    restore_te(layer)
    return handle


def _fp8_region(handle: TEHandle):
    if handle.te.manager.is_fp8_enabled():
        return contextlib.nullcontext()  # the caller's region owns the TE recipe and the cadence
    if not handle.warned:
        handle.warned = True
        warnings.warn(
            "fp8lab.Linear(backend='te') opened its own te.autocast region. Transformer "
            "Engine updates the scaling of all its modules at every region exit, so with "
            "several TE layers each amax history rolls once per layer per step. Wrap the "
            "model's forward in `with fp8lab.gemm.backends.te.autocast(scaling):` for TE's "
            "once-per-step update.",
            RuntimeWarning,
            stacklevel=4,  # the fp8lab.Linear.forward that called TEBackend.forward
        )
    return _region(handle.te.te, handle.te_recipe)


class TEBackend:
    """The whole layer in a Transformer Engine ``te.Linear``; TE owns the scaling."""

    name = "te"
    fp8 = True

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` through TE; ``x`` is (..., in_features) on the layer's CUDA device."""
        return _te_forward(ensure_handle(layer), x)

    def scaling_view(self, layer: nn.Module) -> ScalingView:
        """TE casts inside its kernels: no cast statistics; under delayed scaling the scale
        and amax history are TE's, mirrored; other scalings keep none fp8lab can read."""
        device = layer.weight.device
        state = layer.fp8_state
        if state is None:
            nan = not_measured(device, 2)
            return ScalingView(nan[:, 0], nan[:, 1], not_measured(device), layer.telemetry.fault_counts(device))
        sync_from_te(layer)  # the mirror, refreshed from TE (no-op before TE ran the layer)
        return ScalingView(state.scale, state.amax_history[0], not_measured(device), state.faults, state.amax_history)


def _te_forward(handle: TEHandle, x: torch.Tensor) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])  # (B*T, K)
    tokens = x2d.shape[0]
    pad = -tokens % TE_TOKEN_MULTIPLE
    if pad:  # zero rows: exact (no amax, weight or bias gradient changes); costs one copy
        x2d = F.pad(x2d, (0, 0, 0, pad))
    # TE takes its activation dtype from torch.autocast, else from x, and refuses x whose
    # dtype differs from the float32 parameters: give a low-precision x its own autocast.
    low_precision_x = x.dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled("cuda")
    amp = torch.autocast("cuda", dtype=x.dtype) if low_precision_x else contextlib.nullcontext()
    with torch.cuda.device(x.device), amp, _fp8_region(handle):
        y2d = handle.module(x2d)  # (B*T + pad, N)
    return y2d[:tokens].reshape(*x.shape[:-1], y2d.shape[-1])
