"""examples/gpt_table.py in quick mode: every arm trains, and InRank's ranks are measured."""

from inrank_fx.demo.gpt import GPTConfig


def test_quick_table(load_example):
    script = load_example("gpt_table")
    gpt = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64)
    runs = script.run_table(24, [0], [0.9], gpt, progress=False)
    by_arm = {r["arm"]: r for r in runs}
    assert set(by_arm) == set(script.ARMS)
    for arm in ("inrank", "efficient"):
        ranks = by_arm[arm]["ranks"]
        assert max(ranks.values()) < 64 and len(set(ranks.values())) > 1, (arm, ranks)
    assert by_arm["fixed"]["ranks"] == by_arm["efficient"]["ranks"]  # same parameters
    assert by_arm["fixed"]["params"] == by_arm["efficient"]["params"]
    text = script.table(runs)
    assert text.splitlines()[1].startswith("dense") and len(text.splitlines()) == 2 + len(runs)
    assert "not a comparison with a tuned dense model" in text.splitlines()[-1]
