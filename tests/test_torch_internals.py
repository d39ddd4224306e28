"""Private torch internals are reached through one module per layer (`torch_internals.py`),
and each of those names what this torch lacks."""
import io
import re
import tokenize
from pathlib import Path

import pytest

import inrank_fx.nn.torch_internals as nn_internals
import inrank_fx.passes.torch_internals as passes_internals

PACKAGE = Path(nn_internals.__file__).parents[1]
DOOR = "torch_internals.py"
# `x._name` on anything but self/cls, `torch._x`, and imports of private torch modules or names
ATTRIBUTE = re.compile(r"\b(?!self\b|cls\b)([A-Za-z_]\w*)(?:\[[^\]]*\])?\.(_[a-zA-Z]\w*)")
IMPORT = re.compile(r"^\s*(?:from\s+torch[\w.]*\s+import\s+.*\b_[a-z]\w*|"
                    r"from\s+torch(?:\.\w+)*\._\w+|import\s+torch(?:\.\w+)*\._\w+)", re.M)


def _own_private_names() -> set[str]:
    """Private names inrank_fx defines itself (its functions, attributes, methods)."""
    own = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        own |= set(re.findall(r"def (_\w+)", text))
        own |= set(re.findall(r"\b(?:self|cls|layer|module)\.(_\w+)\s*=", text))
        own |= set(re.findall(r"^(_\w+)\s*[:=]", text, re.M))
        own |= set(re.findall(r"^\s+(_\w+)\s*[:=]", text, re.M))
    return own | {n for n in re.findall(r'"(_inrank_\w+)"', "".join(
        p.read_text() for p in PACKAGE.rglob("*.py")))}


def _code(path: Path) -> str:
    """The file's code without its strings and comments (a logger's name is no attribute)."""
    out, last = [], (1, 0)
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            continue
        if tok.start[0] != last[0]:
            out.append("\n" * (tok.start[0] - last[0]))
            last = (tok.start[0], 0)
        out.append(" " * max(0, tok.start[1] - last[1]) + tok.string)
        last = tok.end
    return "".join(out)


def torch_private_reads(path: Path, own: set[str]) -> list[str]:
    text = _code(path)
    found = [f"{m.group(1)}.{m.group(2)}" for m in ATTRIBUTE.finditer(text)
             if m.group(2) not in own and not m.group(2).startswith("__")
             and m.group(1) not in ("inrank_fx",)]
    return found + [m.group(0).strip() for m in IMPORT.finditer(text)]


def test_private_torch_names_are_reached_from_one_module_per_layer():
    own = _own_private_names()
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == DOOR:
            continue
        reads = torch_private_reads(path, own)
        if reads:
            offenders[str(path.relative_to(PACKAGE))] = sorted(set(reads))
    assert offenders == {}, f"private torch names outside {DOOR}: {offenders}"


def test_the_check_finds_a_private_read(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from torch.utils import _pytree\n"
                      "def f(ddp, self):\n    ddp._ddp_init_helper(); self._mine = 1\n")
    assert torch_private_reads(sample, set()) == ["ddp._ddp_init_helper",
                                                  "from torch.utils import _pytree"]


@pytest.mark.parametrize("door", [nn_internals, passes_internals], ids=["nn", "passes"])
def test_this_torch_has_every_internal_the_library_uses(door):
    assert door.missing() == [], f"{door.__name__}: this torch lacks {door.missing()}"


def test_a_missing_internal_is_named(monkeypatch):
    monkeypatch.setattr(passes_internals, "C_LINEAR", None)
    assert passes_internals.missing() == ["torch._C._nn.linear"]
