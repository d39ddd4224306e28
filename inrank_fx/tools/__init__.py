"""Tools on top of the stages: `summary` (a model's factored layers against dense) and `bench`
(dense against factored on every backend). The `inrank-fx` command (`inrank_fx.cli`) sits above
them and the demo."""
