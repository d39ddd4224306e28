import json

import pytest

from inrank_fx import InRankConfig, InRankError


@pytest.mark.parametrize(
    "field, value",
    [
        ("init", "orthogonal"),
        ("init_rank", 0),
        ("init_rank", 1.5),
        ("init_rank", -0.1),
        ("init_rank", "half"),
        ("init_rank", True),
        ("buffer", -1),
        ("threshold", 1.0),
        ("threshold", 0.0),
        ("threshold", -0.5),
        ("threshold", True),
        ("threshold", "0.9"),
        ("criterion", "entropy"),
        ("criterion", "Variance"),
        ("measure", "gradient"),
        ("measure", None),
        ("ranks_only_grow", "yes"),
        ("silent_buffer", 0),
        ("warmup_steps", -1),
        ("check_every", 0),
        ("stop_after", -5),
        ("stop_after", "auto"),
        ("settle_checks", 0),
        ("settle_tolerance", 1.0),
        ("settle_tolerance", -0.1),
        ("rank_multiple", 0),
        ("truncate_state", "rotate"),
        ("min_features", 0),
        ("targets", "(unclosed"),
        ("exclude", [1, 2]),
    ],
)
def test_out_of_range_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"InRankConfig\.{field}"):
        InRankConfig(**{field: value})


def test_auto_rank_needs_svd_init():
    with pytest.raises(ValueError, match="init_rank='auto'.*init='svd'"):
        InRankConfig(init="random", init_rank="auto")
    InRankConfig(init="svd", init_rank="auto")


def test_rank_and_width_resolution():
    cfg = InRankConfig(init_rank=0.25, buffer=0.1, rank_multiple=8)
    assert cfg.rank_for(100) == 25
    assert cfg.buffer_for(100) == 10
    assert cfg.width_for(25, 100) == 40  # 35 rounded up to a multiple of 8
    assert cfg.width_for(95, 100) == 100  # capped at the full rank
    assert InRankConfig(init_rank=7, buffer=0).width_for(7, 100) == 7


def test_targets_and_exclude_patterns():
    cfg = InRankConfig(targets=["c_fc", "attn.*"], exclude=["h.1.*"])
    assert cfg.selects("transformer.h.0.mlp.c_fc")
    assert cfg.selects("attn.c_attn")
    assert not cfg.selects("transformer.h.0.mlp.c_proj")
    assert not cfg.selects("h.1.mlp.c_fc")
    regex = InRankConfig(targets=r".*\.mlp\..*")
    assert regex.selects("h.0.mlp.c_fc") and not regex.selects("h.0.attn.c_attn")


def test_save_and_load_round_trip(tmp_path):
    config = InRankConfig(init_rank=0.25, buffer=3, targets=["mlp.*"], stop_after=150,
                          truncate_state="rotated")
    path = config.save(tmp_path / "inrank_config.json")
    assert InRankConfig.load(path) == config
    # a field from a newer version is ignored with a warning; a missing one takes its default
    values = json.loads(path.read_text())
    del values["truncate_state"]
    path.write_text(json.dumps({**values, "from_the_future": 1}))
    with pytest.warns(UserWarning, match="from_the_future"):
        loaded = InRankConfig.load(path)
    assert loaded.buffer == 3 and loaded.truncate_state == InRankConfig().truncate_state


def test_save_refuses_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InRankConfig().save(tmp_path / "nope" / "c.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field, value, error", [
    ("threshold", "0.9", TypeError), ("threshold", 1.5, ValueError),
    ("warmup_steps", 2.5, TypeError), ("warmup_steps", -1, ValueError),
    ("init_rank", True, TypeError), ("init_rank", "half", ValueError),
    ("measure", None, TypeError), ("measure", "gradient", ValueError),
    ("ranks_only_grow", "yes", TypeError), ("settle_tolerance", 2.0, ValueError),
])
def test_one_rule_wrong_type_is_a_type_error_wrong_value_a_value_error(field, value, error):
    with pytest.raises(error) as caught:
        InRankConfig(**{field: value})
    assert isinstance(caught.value, InRankError)
    # a wrong type is also a ValueError (what it was before the rule); a wrong value never a
    # TypeError
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, TypeError) == (error is TypeError)
