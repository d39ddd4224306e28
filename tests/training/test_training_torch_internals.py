"""The private torch internals the training layer uses live in one module, torch_internals.py:
this torch has every one of them, the probe names one that is missing, and no other module of
the training package reaches a private torch attribute or module."""
import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import inrank_fx.training
from inrank_fx.training import torch_internals
from inrank_fx.training.torch_internals import missing_internals

TRAINING = Path(inrank_fx.training.__file__).parent
# `x._name` where x is anything but self / cls / super(): a name, a subscript or a call
# (torch._dynamo, ddp._ddp_init_helper, ddp.reducer._set_static_graph, layers[n]._parameters,
# module._get_fsdp_state()). Private modules are caught too (torch.distributed.fsdp._fully_shard).
PRIVATE_READ = re.compile(r"\b(?!self\b|cls\b|super\b)[A-Za-z_]\w*(?:\[[^\]]*\]|\([^()]*\))?"
                          r"\._[a-z]")
# A private attribute named in a string: getattr(ddp, "_comm_hooks", []), hasattr(state, "_x").
PRIVATE_BY_NAME = re.compile(r"\b(?:get|has|set|del)attr\(\s*(?!self\b|cls\b)[^,()]+,\s*"
                             r"[rbu]?[\"']_[a-z]")


def _code_only(source: str) -> list[str]:
    """The source's lines with comments and plain string literals blanked (docstrings and
    messages may name torch internals); f-strings stay, since their fields are code."""
    lines = source.splitlines()
    blank = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        plain = token.type == tokenize.STRING and "f" not in token.string.split("'")[0] \
            .split('"')[0].lower()
        if token.type == tokenize.COMMENT or plain or \
                token.type == getattr(tokenize, "FSTRING_MIDDLE", None):
            blank.append((token.start, token.end))
    for (row, col), (end_row, end_col) in reversed(blank):
        for number in range(row, end_row + 1):
            line = lines[number - 1]
            start = col if number == row else 0
            stop = end_col if number == end_row else len(line)
            lines[number - 1] = line[:start] + " " * (stop - start) + line[stop:]
    return lines


def private_torch_uses(source: str) -> list[tuple[int, str]]:
    """(line, text) of every private access the rule forbids outside torch_internals.py."""
    found = {number: line for number, line in enumerate(_code_only(source), 1)
             if PRIVATE_READ.search(line)}
    found.update({number: line for number, line in enumerate(source.splitlines(), 1)
                  if PRIVATE_BY_NAME.search(line)})
    for node in ast.walk(ast.parse(source)):  # `from torch.x import _y`, also over many lines
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch" \
                and any(a.name.startswith("_") and not a.name.startswith("__")
                        for a in node.names):
            found[node.lineno] = f"from {node.module} import ..."
    lines = source.splitlines()
    return sorted((n, lines[n - 1].strip()) for n in found)


@pytest.mark.parametrize("line", [
    "import torch._dynamo",
    "from torch._dynamo import convert_frame",
    "from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam",
    "from torch._dynamo.eval_frame import (\n    _debug_get_cache_entry_list,\n)",
    "from torch.distributed import _register_comm_hook",
    "limit = torch._dynamo.config.recompile_limit",
    "ddp._ddp_init_helper(parameters, sparse, mapping, ddp.static_graph)",
    "self.ddp.reducer._set_static_graph()",
    "dist._register_comm_hook(ddp.reducer, state, hook)",
    "layers[name]._parameters[factor] = full",
    "state = module._get_fsdp_state()",
    "fresh._param_fqn = fsdp_param._param_fqn",
    "message = f\"on '{group._module_fqn}'\"",
    "for hook, state in getattr(ddp, \"_comm_hooks\", []): pass",
])
def test_the_rule_flags_private_torch_access(line):
    assert private_torch_uses(line + "\n"), line


@pytest.mark.parametrize("line", [
    "self._step = controller.step",
    "self._gathered[(name, factor)] = sharded",
    "cls._cache = {}",
    "super()._load(x)",
    "from .distributed import _broadcast_tensors",
    "from .._io import atomic_write",
    "x = torch.__version__",
    "hasattr(type(m).forward, '__code__')",
    "log.info('torch._dynamo.config.force_parameter_static_shapes = False')",
    "# ddp._ddp_init_helper is rebuilt by torch_internals",
    '"""Uses `torch.distributed.fsdp._fully_shard`."""',
])
def test_the_rule_leaves_own_attributes_strings_and_comments_alone(line):
    assert not private_torch_uses(line + "\n"), line


def test_only_torch_internals_reaches_private_torch_attributes():
    found = {f"{path.name}:{number}": text
             for path in sorted(TRAINING.rglob("*.py")) if path.name != "torch_internals.py"
             for number, text in private_torch_uses(path.read_text())}
    assert not found, (
        "private torch attributes or modules reached outside inrank_fx/training/"
        f"torch_internals.py (add a named function there and call it): {found}")


# -- the probe ----------------------------------------------------------------------------------

def test_this_torch_has_every_internal_the_training_layer_uses():
    missing = missing_internals()
    assert set(missing) == {"DDP", "FSDP2", "dynamo"}
    lacking = {subsystem: names for subsystem, names in missing.items() if names}
    assert not lacking, (
        f"torch {torch.__version__} lacks internals inrank_fx's training layer uses: "
        + "; ".join(f"{subsystem}: {', '.join(names)}" for subsystem, names in lacking.items())
        + " (inrank_fx/training/torch_internals.py says what each is for)")
    assert not (dist.is_available() and dist.is_initialized())  # probed without a process group


def test_the_probe_names_a_missing_method(monkeypatch):
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.delattr(DistributedDataParallel, "_build_debug_param_to_name_mapping")
    monkeypatch.delattr(dist, "_register_comm_hook")
    missing = missing_internals()
    assert missing["DDP"] == ["DistributedDataParallel._build_debug_param_to_name_mapping",
                              "torch.distributed._register_comm_hook"]
    assert missing["FSDP2"] == [] and missing["dynamo"] == []


def test_the_probe_names_a_missing_instance_attribute(monkeypatch):
    # FSDPParamGroup._module_fqn is set in __init__: found by reading the class's code, and
    # reported once no method of the class assigns it any more.
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    assert torch_internals._class_has(FSDPParamGroup, "_module_fqn")
    assert not torch_internals._class_has(FSDPParamGroup, "_no_such_attribute")
    monkeypatch.setattr(torch_internals, "GROUP_INTERNALS",
                        (*torch_internals.GROUP_INTERNALS, "_no_such_attribute"))
    monkeypatch.delattr(FSDPParam, "init_dtype_attrs")
    assert missing_internals()["FSDP2"] == ["FSDPParamGroup._no_such_attribute",
                                            "FSDPParam.init_dtype_attrs"]


def test_the_probe_names_a_missing_dynamo_internal(monkeypatch):
    from torch._dynamo import eval_frame

    monkeypatch.delattr(eval_frame, "_debug_get_cache_entry_list")
    monkeypatch.delattr(torch._dynamo, "reset_code")
    assert missing_internals()["dynamo"] == [
        "torch._dynamo.reset_code", "torch._dynamo.eval_frame._debug_get_cache_entry_list"]


def test_without_reset_code_nothing_is_cleared(monkeypatch):
    monkeypatch.delattr(torch._dynamo, "reset_code")
    code = test_without_reset_code_nothing_is_cleared.__code__
    assert torch_internals.reset_compiled_code(code) is False


def test_every_function_names_its_internals_and_the_torch_versions():
    source = ast.parse(Path(torch_internals.__file__).read_text())
    undocumented = [node.name for node in source.body
                    if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
                    and not ("Uses " in (ast.get_docstring(node) or "")
                             and all(v in ast.get_docstring(node)
                                     for v in torch_internals.TESTED_ON))]
    assert not undocumented, (
        f"functions of torch_internals.py whose docstring does not say which internals they use "
        f"(\"Uses ...\") and that they are tested on torch {torch_internals.TESTED_ON}: "
        f"{undocumented}")
