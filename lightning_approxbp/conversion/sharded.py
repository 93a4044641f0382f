"""Convert a model that FSDP2 (``fully_shard``) already manages, without running it.

Lightning's large-model pattern builds the model in ``configure_model`` (often on the meta
device) and calls ``fully_shard`` on each block and the root there, so a callback only sees the
model once it is sharded. Its parameters are then sharded ``DTensor`` s that only FSDP2's hooks
gather, and FSDP2 keeps, for every parameter, the (module, name) pair it swaps the gathered
tensor into before each forward. Conversion therefore:

1. builds a *skeleton*: the same module tree with meta parameters of the full (unsharded) shapes
   and dtypes, without FSDP2's classes and hooks, and converts it with the meta-device path of
   :func:`~lightning_approxbp.conversion.convert` (one plan per block kind, checks on
   materialised twins; nothing is gathered, no rank runs the full model);
2. *transplants* each module the conversion replaced into the real model: the replacement is
   copied with every reference to a skeleton module, parameter or buffer mapped back to the real
   one, so the new module holds the real (sharded) parameters under the same names and the state
   dict keys are unchanged;
3. points FSDP2's (module, name) pairs at the replacements, which hold the same parameter objects.

The modules ``fully_shard`` was applied to (the blocks and the root) are never replaced, so
FSDP2's hooks, groups and states stay as they were. Tensor parallelism (DTensor parameters that
FSDP2 did not make) and FSDP1 keep their own per-module state and are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor

# Hooks whose functions live here belong to FSDP2's machinery, not to the model.
_FSDP_CODE = "torch.distributed.fsdp"
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
# The skeleton is never saved or loaded; these hooks often hold the real module (checkpoint_wrapper's do)
_STATE_DICT_HOOKS = ("_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_HOOK_DICTS = (*_CALL_HOOKS, *_STATE_DICT_HOOKS)


_STATE_KEYS = "__composable_api"
_TREE = ("_parameters", "_buffers", "_modules", *_HOOK_DICTS)
_MISSING = object()


def sharded_modules(root: nn.Module) -> list[str]:
    """Names of the modules of ``root`` managed by FSDP or holding tensor-parallel parameters."""
    return [
        name or type(root).__name__
        for name, module in root.named_modules()
        if isinstance(module, (FSDPModule, FullyShardedDataParallel))
        or any(isinstance(p, DTensor) for p in module.parameters(recurse=False))
    ]


def describe(names: list[str]) -> str:
    """The first few names, and how many more."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def fsdp2_modules(root: nn.Module) -> list[FSDPModule]:
    """The modules of ``root`` that ``fully_shard`` was applied to."""
    return [module for module in root.modules() if isinstance(module, FSDPModule)]


def why_not_convertible(root: nn.Module) -> str | None:
    """Why a sharded ``root`` cannot be converted after sharding; ``None`` when it can (FSDP2 only)."""
    if any(isinstance(module, FullyShardedDataParallel) for module in root.modules()):
        return "it is wrapped by FSDP1 (FullyShardedDataParallel), which flattens the parameters of whole modules"
    managed = {id(fsdp_param.sharded_param) for fsdp_param in _fsdp_params(root)}
    if any(fsdp_param.is_dtensor for fsdp_param in _fsdp_params(root)):
        return "its parameters were already DTensors when fully_shard ran (tensor parallelism)"
    tensor_parallel = [name for name, p in root.named_parameters() if isinstance(p, DTensor) and id(p) not in managed]
    if tensor_parallel:
        return f"{tensor_parallel[0]} is a DTensor that FSDP2 does not manage (tensor parallelism)"
    return None


def _fsdp_params(root: nn.Module) -> Iterator[Any]:
    for module in fsdp2_modules(root):
        group = module._get_fsdp_state()._fsdp_param_group
        if group is not None:
            yield from group.fsdp_params


def convert_sharded(root: nn.Module, convert: Callable[[nn.Module], Any]) -> Any:
    """Run ``convert`` on a meta skeleton of the FSDP2-sharded ``root``, then apply its changes to
    ``root``; return what ``convert`` returned.

    Raises:
        ValueError: when ``root`` is sharded in a way that conversion cannot follow, or when a
            module the conversion would replace is itself a ``fully_shard`` unit.
    """
    why = why_not_convertible(root)
    if why is not None:
        raise ValueError(
            f"The model cannot be converted after sharding: {why}. Call convert(model, example_input) before "
            "sharding it."
        )
    skeleton, originals = meta_skeleton(root)
    result = convert(skeleton)
    replaced = transplant(skeleton, root, originals)
    _point_fsdp_at(root, replaced)
    return result


def meta_skeleton(root: nn.Module) -> tuple[nn.Module, dict[int, Any]]:
    """A copy of ``root``'s module tree with meta parameters and buffers of the full shapes, and
    no FSDP2 classes or hooks; and the map from each skeleton object's id to the real object.

    The copy is shallow otherwise: attributes that are not modules or tensors are shared.
    """
    originals: dict[int, Any] = {}
    tensors: dict[int, Tensor] = {}  # real tensor id -> its meta twin, so tied weights stay tied
    modules: dict[int, nn.Module] = {}

    def meta(tensor: Tensor) -> Tensor:
        if id(tensor) not in tensors:
            empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            twin = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
            tensors[id(tensor)] = twin
            originals[id(twin)] = tensor
        return tensors[id(tensor)]

    def copy_module(module: nn.Module) -> nn.Module:
        if id(module) in modules:
            return modules[id(module)]
        cls = type(module)
        if isinstance(module, FSDPModule):  # FSDP2 made a subclass; its __new__ calls __init__
            cls = next(base for base in cls.__bases__ if base is not FSDPModule)
        twin = object.__new__(cls)
        # FSDP2's per-module state (under keys of torch's composable API) stays with the real module
        twin.__dict__.update((key, value) for key, value in vars(module).items() if not key.startswith(_STATE_KEYS))
        modules[id(module)] = twin
        originals[id(twin)] = module
        twin._parameters = {name: None if p is None else meta(p) for name, p in module._parameters.items()}
        twin._buffers = {name: None if b is None else meta(b) for name, b in module._buffers.items()}
        twin._modules = {name: None if child is None else copy_module(child) for name, child in module._modules.items()}
        for hooks in _CALL_HOOKS:
            kept = {key: hook for key, hook in getattr(module, hooks).items() if not _is_fsdp_hook(hook)}
            setattr(twin, hooks, type(getattr(module, hooks))(kept))
        for hooks in _STATE_DICT_HOOKS:
            setattr(twin, hooks, type(getattr(module, hooks))())
        return twin

    skeleton = copy_module(root)
    for twin in modules.values():
        # plain references between modules (a merged linear's norm) point into the skeleton too
        for key, value in vars(twin).items():
            if isinstance(value, nn.Module) and key not in _TREE and id(value) in modules:
                twin.__dict__[key] = modules[id(value)]
    return skeleton, originals


def _is_fsdp_hook(hook: Any) -> bool:
    function = getattr(hook, "func", hook)  # functools.partial
    return getattr(function, "__module__", "").startswith(_FSDP_CODE)


def transplant(skeleton: nn.Module, root: nn.Module, originals: dict[int, Any]) -> dict[int, nn.Module]:
    """Put into ``root`` every module that conversion replaced in ``skeleton``, holding ``root``'s
    own parameters; return ``{id(replaced module): the module now holding its parameters}``.

    Raises:
        ValueError: when a replaced module is a ``fully_shard`` unit, or a replacement holds a
            tensor that conversion made on the skeleton (it would stay on the meta device).
    """
    # Every skeleton object maps back to the real one, so references anywhere in a replacement
    # (children, parameters, a merged linear's norm) land on the real model.
    memo: dict[int, Any] = {key: value for key, value in originals.items()}
    replaced: dict[int, nn.Module] = {}

    def walk(skeleton_module: nn.Module, real_module: nn.Module, prefix: str) -> None:
        _copy_set_attributes(skeleton_module, real_module, memo)
        for name, child in skeleton_module._modules.items():
            real_child = real_module._modules.get(name)
            if child is not None and originals.get(id(child)) is real_child:
                walk(child, real_child, f"{prefix}{name}.")
                continue
            if isinstance(real_child, FSDPModule):
                raise ValueError(
                    f"Conversion would replace {prefix}{name}, which fully_shard manages as a unit; apply fully_shard "
                    "to its parent instead, or convert before sharding."
                )
            new = copy.deepcopy(child, memo)
            _refuse_skeleton_tensors(new, originals, f"{prefix}{name}")
            _mark_managed(new, real_child)
            real_module._modules[name] = new
            if real_child is not None:
                _record_owners(real_child, new, replaced)

    walk(skeleton, root, "")
    return replaced


def _copy_set_attributes(skeleton_module: nn.Module, real_module: nn.Module, memo: dict[int, Any]) -> None:
    """Attributes conversion set on a module it kept (e.g. a function activation stored as an attribute)."""
    real = vars(real_module)
    for key, value in vars(skeleton_module).items():
        if key not in _TREE and not key.startswith("_forward") and real.get(key, _MISSING) is not value:
            real[key] = copy.deepcopy(value, memo)


def _refuse_skeleton_tensors(new: nn.Module, originals: dict[int, Any], fqn: str) -> None:
    real = {id(value) for value in originals.values()}
    for name, tensor in (*new.named_parameters(), *new.named_buffers()):
        if tensor.is_meta and id(tensor) not in real:
            raise ValueError(
                f"The conversion of {fqn} made a tensor ({name}) from the model's parameters, which a sharded model "
                "cannot follow; convert before sharding, or exclude it with filter=..."
            )


def _mark_managed(new: nn.Module, old: nn.Module | None) -> None:
    """FSDP2 marks the modules it manages (torch.compile reads the marks); replacements inherit them."""
    for attribute in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
        if old is not None and hasattr(old, attribute):
            for module in new.modules():
                setattr(module, attribute, getattr(old, attribute))


def _record_owners(old: nn.Module, new: nn.Module, replaced: dict[int, nn.Module]) -> None:
    """For every module of ``old``'s subtree, the module of ``new`` that now registers its parameters."""
    owners = {id(p): module for module in new.modules() for p in module._parameters.values() if p is not None}
    for module in old.modules():
        for p in module._parameters.values():
            if p is not None and id(p) in owners:
                replaced[id(module)] = owners[id(p)]


def _point_fsdp_at(root: nn.Module, replaced: dict[int, nn.Module]) -> None:
    """Repoint FSDP2's (module, parameter name) pairs from replaced modules to their replacements."""
    for fsdp_param in _fsdp_params(root):
        info = fsdp_param._module_info
        owner = _new_owner(replaced, info.module, info.param_name)
        if owner is not info.module:
            info.module = owner
            # FSDP2 re-pads the local shard after load_state_dict through a hook on the owner
            fsdp_param._post_load_hook_handle.remove()
            fsdp_param._post_load_hook_handle = owner.register_load_state_dict_post_hook(
                _reset_after_load(fsdp_param)
            )
        info.shared_modules = [
            _new_owner(replaced, module, name) for module, name in zip(info.shared_modules, info.shared_param_names)
        ]


def _reset_after_load(fsdp_param: Any) -> Callable[..., None]:
    def hook(*args: Any, **kwargs: Any) -> None:
        fsdp_param.reset_sharded_param()

    return hook


def _new_owner(replaced: dict[int, nn.Module], module: nn.Module, name: str) -> nn.Module:
    new = replaced.get(id(module), module)
    if new._parameters.get(name) is not module._parameters.get(name):
        raise ValueError(
            f"After conversion, {type(new).__name__} does not hold the parameter {name!r} of the module it replaced, "
            "so FSDP2 could not swap it in; convert before sharding."
        )
    return new
