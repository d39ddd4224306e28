"""Every fenced Python block in README.md and docs/*.md runs, in order within its file, with the
names a reader brings (their model, data, loss, example input) supplied by the harness below.
A block that stops working fails here instead of in a new user's first hour."""
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NEEDS_TRANSFORMERS = "Trainer("

# What a reader supplies: a model, a few batches, a loss, an example input. Run before each file.
PRELUDE = textwrap.dedent("""
    import torch, inrank_fx
    from torch import nn
    from inrank_fx import InRankConfig

    class MyModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    build_model = MyModel
    model = MyModel()
    data = [(torch.randn(8, 32), torch.randn(8, 32)) for _ in range(3)]
    loss_fn = nn.functional.mse_loss
    example = torch.randn(2, 32)
    config = InRankConfig(init_rank=2)
    device = "cpu"
    path = "checkpoint.pt"
    step = len(data)
""")

HF_PRELUDE = textwrap.dedent("""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.arange(i, i + 16) % 64
            return {"input_ids": ids, "labels": ids}

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                        use_cache=False)
    args = TrainingArguments(output_dir="trainer", max_steps=3, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True)
    data = Tokens()
""")


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def documents() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
            if python_blocks(p)]


def run_script(source: str, cwd: Path, env: dict | None = None) -> None:
    script = cwd / "doc_blocks.py"
    script.write_text(source)
    result = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_docs_have_python_blocks():
    names = {p.name for p in documents()}
    assert {"README.md", "TRAINING.md", "DISTRIBUTED.md"} <= names


@pytest.mark.parametrize("doc", [p.relative_to(ROOT).as_posix() for p in documents()])
def test_python_blocks_run(doc, tmp_path):
    blocks = [b for b in python_blocks(ROOT / doc) if NEEDS_TRANSFORMERS not in b]
    if not blocks:
        pytest.skip(f"{doc}: every block needs transformers (test_trainer_blocks_run)")
    env = None
    source = PRELUDE + "\n".join(blocks)
    if "init_process_group" in source:  # one process on gloo, as torchrun would set it up
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**__import__("os").environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
        source += "\ndist.destroy_process_group()\n"
    run_script(source, tmp_path, env)


def test_trainer_blocks_run(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    blocks = [b for p in documents() for b in python_blocks(p) if NEEDS_TRANSFORMERS in b]
    assert blocks, "no block uses transformers' Trainer any more: drop this test"
    run_script(PRELUDE + HF_PRELUDE + "\n".join(blocks), tmp_path)


def test_readme_trainer_line_resolves():
    pytest.importorskip("transformers")
    line = re.search(r"callbacks=\[(inrank_fx\.[\w.]+)\(\)\]", (ROOT / "README.md").read_text())
    assert line, "the README no longer shows the Trainer callback"
    import inrank_fx

    obj = inrank_fx
    for part in line.group(1).split(".")[1:]:
        obj = getattr(obj, part)
    assert isinstance(obj, type) and obj.__name__ == "InRankCallback"


def test_readme_lists_every_config_field():
    import dataclasses

    from inrank_fx import InRankConfig

    text = (ROOT / "README.md").read_text()
    listed = re.search(r"`InRankConfig` holds every knob \((.*?)\)", text, re.S)
    assert listed, "the README no longer lists InRankConfig's knobs"
    names = re.findall(r"`(\w+)`", listed.group(1))
    assert names == [f.name for f in dataclasses.fields(InRankConfig)]
