"""Every private torch internal the training layer uses, behind named functions, one section per
torch subsystem: DDP (rebuilding the reducer after a resize), FSDP2 (re-sharding a resized
factor) and dynamo (keeping compiled code compiled through rank changes).

torch has no public API for any of the three, so inrank_fx reaches into torch here and nowhere
else in the training package: distributed.py, sharded.py and compile_policy.py call these
functions and touch no private torch attribute or module themselves (the rule is kept by
tests/training/test_training_torch_internals.py). Each function's docstring names the internals
it uses; all of them are tested on torch 2.14.1 (CI). The GPU image's torch 2.11 is not tested yet
(no GPU has been lent to a session: docs/RESULTS.md section 5); `missing_internals()` says what it
lacks, if anything, before any of them is used.

`missing_internals()` probes for every one of them (attributes, methods, modules) without
starting a process group, so that a torch upgrade that drops one fails a test naming it, not a
training run. The functions here raise nothing of their own: the callers turn what they report
into InRankDistributedError and the like, with the advice that fits.
"""
from __future__ import annotations

import dis
import inspect
from types import CodeType

import torch
import torch._dynamo
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

TESTED_ON = ("2.14.1",)  # torch versions whose internals these functions are tested on


# -- DDP: rebuilding DistributedDataParallel's reducer after a resize -------------------------

# What the rebuild cannot do without (checked before it starts, by the caller).
DDP_REBUILD_INTERNALS = ("reducer", "_build_params_for_reducer",
                         "_build_debug_param_to_name_mapping", "_ddp_init_helper",
                         "parameters_to_ignore")
# Read with a default where a torch may lack them.
DDP_OPTIONAL_INTERNALS = ("_accum_grad_hooks", "_comm_hooks", "_delay_all_reduce_params",
                          "_use_python_reducer")


def ddp_lacks(ddp: DistributedDataParallel) -> list[str]:
    """The names of DDP_REBUILD_INTERNALS that `ddp` lacks (empty on a torch that can rebuild).

    Uses DistributedDataParallel.reducer, _build_params_for_reducer,
    _build_debug_param_to_name_mapping, _ddp_init_helper, parameters_to_ignore (tested on torch
    2.14.1)."""
    return [a for a in DDP_REBUILD_INTERNALS if not hasattr(ddp, a)]


def ddp_delays_all_reduce(ddp: DistributedDataParallel) -> bool:
    """Whether `ddp` was made with delay_all_reduce_named_params (a rebuild would lose them).

    Uses DistributedDataParallel._delay_all_reduce_params (absent: False; tested on torch 2.14.1)."""
    return bool(getattr(ddp, "_delay_all_reduce_params", []))


def rebuild_ddp_reducer(ddp: DistributedDataParallel) -> None:
    """Rebuild DDP's reducer on the module's current parameters, as DDP's own __setstate__ does
    (the caller has checked `ddp_lacks` and refused what a rebuild does not carry over).

    The old reducer's autograd hooks (and the Python reducer's accumulate-grad hooks) are removed
    first, since they would still fire for unchanged parameters and all-reduce into stale
    buckets; registered comm hooks and static_graph are put back on the new reducer.

    Uses DistributedDataParallel._module_parameters, _build_params_for_reducer,
    _build_debug_param_to_name_mapping, _ddp_init_helper, _comm_hooks, _has_rebuilt_buckets,
    _use_python_reducer, _accum_grad_hooks, _register_accum_grad_hook;
    torch.distributed._register_comm_hook; Reducer._remove_autograd_hooks,
    Reducer._set_static_graph; Logger._set_static_graph (tested on torch 2.14.1)."""
    ddp.reducer._remove_autograd_hooks()
    for handle in getattr(ddp, "_accum_grad_hooks", []):
        handle.remove()
    ddp._module_parameters = [p for n, p in ddp.module.named_parameters()
                              if n not in ddp.parameters_to_ignore]
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    mapping = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, mapping, ddp.static_graph)
    for hook, state in getattr(ddp, "_comm_hooks", []):
        dist._register_comm_hook(ddp.reducer, state, hook)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
    ddp._has_rebuilt_buckets = False
    if getattr(ddp, "_use_python_reducer", False):
        ddp._accum_grad_hooks = []
        ddp._register_accum_grad_hook()


# -- FSDP2 (fully_shard): re-sharding a resized factor ----------------------------------------

_FSDP = "torch.distributed.fsdp._fully_shard"
# What the re-shard reads of FSDP2's parameter groups and parameters (checked at attach).
GROUP_INTERNALS = ("fsdp_params", "mesh_info", "post_forward_mesh_info", "mp_policy",
                   "offload_policy", "device", "_module_fqn")
PARAM_INTERNALS = ("_module_info", "_post_load_hook_handle", "_param_fqn", "init_dtype_attrs",
                   "sharded_param")
# FSDPParam's constructor, called positionally by replace_sharded_parameter.
FSDP_PARAM_ARGUMENTS = ("param", "module_info", "mesh_info", "post_forward_mesh_info", "device",
                        "shard_placement_fn", "mp_policy", "offload_policy")


def fsdp_state(module: nn.Module):
    """FSDP2's state of one fully_shard-ed module (an FSDPModule).

    Uses FSDPModule._get_fsdp_state (tested on torch 2.14.1)."""
    return module._get_fsdp_state()


def param_groups(model: nn.Module):
    """FSDP2's parameter groups (FSDPParamGroup) of every fully_shard-ed module of `model`.

    Uses FSDPModule._get_fsdp_state, FSDPState._fsdp_param_groups (newer torch: a list per
    module) or FSDPState._fsdp_param_group (torch 2.11: at most one) (tested on torch 2.14.1)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = fsdp_state(module)
            if hasattr(state, "_fsdp_param_groups"):
                yield from state._fsdp_param_groups
            elif state._fsdp_param_group is not None:
                yield state._fsdp_param_group


def group_fqn(group) -> str | None:
    """The name, from the root module, of the module an FSDP parameter group belongs to.

    Uses FSDPParamGroup._module_fqn (tested on torch 2.14.1)."""
    return group._module_fqn


def missing_fsdp_internals(model: nn.Module) -> list[str]:
    """What `model`'s FSDP2 groups and parameters lack of GROUP_INTERNALS and PARAM_INTERNALS,
    as "FSDPParamGroup.<name>" / "FSDPParam.<name>", or the import / attribute error that stopped
    the search (empty: replace_sharded_parameter can re-shard this model's factors).

    Uses torch.distributed.fsdp._fully_shard._fsdp_param.FSDPParam, `param_groups`, and the
    attributes listed (tested on torch 2.14.1)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam  # noqa: F401

        groups = list(param_groups(model))
    except (ImportError, AttributeError) as error:
        return [str(error)]
    return sorted({f"FSDPParamGroup.{a}" for g in groups for a in GROUP_INTERNALS
                   if not hasattr(g, a)} |
                  {f"FSDPParam.{a}" for g in groups for p in g.fsdp_params
                   for a in PARAM_INTERNALS if not hasattr(p, a)})


def module_parameter(module: nn.Module, name: str) -> nn.Parameter:
    """`module`'s parameter `name` as registered (the counterpart of set_module_parameter).

    Uses nn.Module._parameters (tested on torch 2.14.1)."""
    return module._parameters[name]


def set_module_parameter(module: nn.Module, name: str, param: nn.Parameter) -> None:
    """Put `param` in `module`'s registry as `name`, as FSDP2 swaps its own sharded and
    unsharded parameters (unsafe_setattr_param): not through nn.Module.__setattr__, since these
    are temporary swaps of a registered parameter, not new parameters.

    Uses nn.Module._parameters (tested on torch 2.14.1)."""
    module._parameters[name] = param


def replace_sharded_parameter(model: nn.Module, layer: nn.Module, name: str,
                              full: nn.Parameter) -> nn.Parameter | None:
    """Give `full` (layer.<name>, a new shape) a new FSDPParam in the FSDP parameter group that
    owns layer.<name>, as fully_shard builds one; returns the new sharded parameter, or None
    when no group owns it.

    Uses torch.distributed.fsdp._fully_shard._fsdp_param.FSDPParam (its constructor), and of
    the group and parameter: FSDPParamGroup.fsdp_params, mesh_info, post_forward_mesh_info,
    device, mp_policy, offload_policy; FSDPParam._module_info, _param_fqn,
    _post_load_hook_handle, init_dtype_attrs, sharded_param (tested on torch 2.14.1)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    for group in param_groups(model):
        for i, fsdp_param in enumerate(group.fsdp_params):
            info = fsdp_param._module_info
            if info.module is layer and info.param_name == name:
                setattr(layer, name, full)  # FSDPParam shards the module's attribute in place
                fresh = FSDPParam(param=full, module_info=info, mesh_info=group.mesh_info,
                                  post_forward_mesh_info=group.post_forward_mesh_info,
                                  device=group.device, shard_placement_fn=None,
                                  mp_policy=group.mp_policy, offload_policy=group.offload_policy)
                fresh._param_fqn = fsdp_param._param_fqn
                fresh.init_dtype_attrs(group.mp_policy)
                fsdp_param._post_load_hook_handle.remove()
                group.fsdp_params[i] = fresh
                return fresh.sharded_param
    return None


# -- dynamo: compiled code through shape changes -----------------------------------------------

def parameter_shapes_static() -> bool:
    """Whether dynamo treats parameter shapes as static (torch's default).

    Uses torch._dynamo.config.force_parameter_static_shapes (tested on torch 2.14.1)."""
    return torch._dynamo.config.force_parameter_static_shapes


def set_parameter_shapes_static(static: bool) -> None:
    """Set whether dynamo treats parameter shapes as static, for the whole process.

    Uses torch._dynamo.config.force_parameter_static_shapes (tested on torch 2.14.1)."""
    torch._dynamo.config.force_parameter_static_shapes = static


def recompile_limit() -> int:
    """How many graphs dynamo caches for one function before it runs the function eagerly.

    Uses torch._dynamo.config.recompile_limit (tested on torch 2.14.1)."""
    return torch._dynamo.config.recompile_limit


def reset_compiled_code(code: CodeType) -> bool:
    """Clear dynamo's cache of one code object, and only that one; False (nothing cleared) where
    this torch cannot.

    Uses torch._dynamo.reset_code (tested on torch 2.14.1)."""
    if not hasattr(torch._dynamo, "reset_code"):
        return False
    torch._dynamo.reset_code(code)
    return True


def dynamo_cache_entries(fn) -> int:
    """How many compiled graphs dynamo holds for a function (or its code object).

    Uses torch._dynamo.eval_frame._debug_get_cache_entry_list (tested on torch 2.14.1)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(getattr(fn, "__code__", fn)))


def dynamo_compiled_codes() -> list[tuple[CodeType, int]]:
    """(code object, cached graphs) for every function dynamo has compiled (empty where this
    torch does not say).

    Uses torch._dynamo.convert_frame.input_codes.seen and `dynamo_cache_entries` (tested on
    torch 2.14.1)."""
    try:
        from torch._dynamo import convert_frame

        codes = [code for ref in list(convert_frame.input_codes.seen)
                 if (code := ref()) is not None]
        return [(code, dynamo_cache_entries(code)) for code in codes]
    except (ImportError, AttributeError, RuntimeError):
        return []


# -- the probe ---------------------------------------------------------------------------------

def missing_internals() -> dict[str, list[str]]:
    """{subsystem: the dotted names of the internals above that this torch lacks}, for "DDP",
    "FSDP2" and "dynamo": every list is empty on a torch inrank_fx fully works with.

    Uses every internal named above, probed on classes and modules, not live objects, so no
    process group is started: an attribute counts as present when the class has it or one of
    its methods assigns it (`self.<name> =`). The optional DDP internals (read with a default)
    are probed too, since without them a rebuild silently drops what they carry (comm hooks, for
    one). Tested on torch 2.14.1."""
    return {"DDP": _missing_ddp(), "FSDP2": _missing_fsdp2(), "dynamo": _missing_dynamo()}


def _missing_ddp() -> list[str]:
    names = ["module", "static_graph", "logger", "mixed_precision", *DDP_REBUILD_INTERNALS,
             "_module_parameters", "_has_rebuilt_buckets", "_register_accum_grad_hook",
             *DDP_OPTIONAL_INTERNALS]
    missing = [f"DistributedDataParallel.{n}" for n in names
               if not _class_has(DistributedDataParallel, n)]
    if not hasattr(dist, "_register_comm_hook"):
        missing.append("torch.distributed._register_comm_hook")
    for owner, name in (("Reducer", "_remove_autograd_hooks"), ("Reducer", "_set_static_graph"),
                        ("Logger", "_set_static_graph")):
        if not hasattr(getattr(dist, owner, None), name):
            missing.append(f"torch.distributed.{owner}.{name}")
    return missing


def _missing_fsdp2() -> list[str]:
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError as error:
        return [f"{_FSDP} ({error})"]
    missing = [] if hasattr(FSDPModule, "_get_fsdp_state") else ["FSDPModule._get_fsdp_state"]
    if not (_class_has(FSDPState, "_fsdp_param_groups")
            or _class_has(FSDPState, "_fsdp_param_group")):
        missing.append("FSDPState._fsdp_param_groups")
    missing += [f"FSDPParamGroup.{n}" for n in GROUP_INTERNALS
                if not _class_has(FSDPParamGroup, n)]
    missing += [f"FSDPParam.{n}" for n in PARAM_INTERNALS if not _class_has(FSDPParam, n)]
    arguments = inspect.signature(FSDPParam.__init__).parameters  # passed by name
    missing += [f"FSDPParam({n}=)" for n in FSDP_PARAM_ARGUMENTS if n not in arguments]
    return missing


def _missing_dynamo() -> list[str]:
    missing = [f"torch._dynamo.config.{n}"
               for n in ("force_parameter_static_shapes", "recompile_limit")
               if not hasattr(torch._dynamo.config, n)]
    if not hasattr(torch._dynamo, "reset_code"):
        missing.append("torch._dynamo.reset_code")
    try:
        from torch._dynamo import convert_frame
    except ImportError:
        missing.append("torch._dynamo.convert_frame")
    else:
        if not hasattr(getattr(convert_frame, "input_codes", None), "seen"):
            missing.append("torch._dynamo.convert_frame.input_codes.seen")
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list  # noqa: F401
    except ImportError:
        missing.append("torch._dynamo.eval_frame._debug_get_cache_entry_list")
    return missing


def _class_has(cls: type, name: str) -> bool:
    """Whether instances of `cls` have `name`: a class attribute, or one its methods assign."""
    return hasattr(cls, name) or name in _assigned_attributes(cls)


def _assigned_attributes(cls: type) -> set[str]:
    """Every `<object>.<name> = ...` target name in the code of `cls`'s methods (its bases'
    too, nested functions included)."""
    codes = []
    for klass in cls.__mro__[:-1]:  # object aside
        for value in vars(klass).values():
            for part in (value, getattr(value, "__func__", None), getattr(value, "fget", None),
                         getattr(value, "fset", None)):
                code = getattr(inspect.unwrap(part), "__code__", None) if callable(part) else None
                if code is not None:
                    codes.append(code)
    names = set()
    while codes:
        code = codes.pop()
        codes += [c for c in code.co_consts if isinstance(c, CodeType)]
        names.update(i.argval for i in dis.get_instructions(code) if i.opname == "STORE_ATTR")
    return names
