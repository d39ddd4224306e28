"""transformers' Trainer with InRankCallback: ranks adapt on the Trainer's optimizer steps, are
logged in its reports, saved in its checkpoints and restored on resume; a transformed model
saves with save_pretrained (safetensors) and loads back with its ranks."""
import math

import pytest
import torch

from inrank_fx import InRankConfig, ranks, transform

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
from inrank_fx.integrations import InRankCallback, load_transformed, save_transformed  # noqa: E402

CONFIG = InRankConfig(init_rank=2, buffer=4, warmup_steps=5, check_every=5, stop_after=30)


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    return transform(transformers.GPT2LMHeadModel(config), CONFIG)


class Tokens(torch.utils.data.Dataset):
    """Sequences with structure to learn: a random walk over the vocabulary."""

    def __init__(self, n: int = 256, length: int = 16) -> None:
        g = torch.Generator().manual_seed(1)
        steps = torch.randint(-2, 3, (n, length), generator=g)
        self.ids = (steps.cumsum(1) + torch.randint(0, 64, (n, 1), generator=g)) % 64

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(transformers.TrainerCallback):
    """A reporting callback listed after InRankCallback: what it receives in on_log."""

    def __init__(self) -> None:
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def trainer(model, out, *callbacks):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=10, save_strategy="steps", save_steps=20, report_to="none", use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                callbacks=list(callbacks))


def final_loss(run) -> float:
    return [h["loss"] for h in run.state.log_history if "loss" in h][-1]


def test_trainer_checkpoint_and_resume_continue_with_the_same_ranks(tmp_path):
    model, callback, recorder = gpt2(), InRankCallback(), Recorder()
    start = ranks(model)
    run = trainer(model, tmp_path, callback, recorder)
    run.train()
    final = ranks(model)
    assert final != start and len(set(final.values())) > 1  # ranks moved, per layer
    assert callback.controller.stopped and callback.controller.step == 40
    logged = [h for h in run.state.log_history if "inrank/mean_rank" in h]
    assert logged and logged[-1]["inrank/rank_events"] == callback.controller.rank_events
    assert any("inrank/mean_rank" in logs for logs in recorder.logs)  # reporters after it see them
    # every step with a rank change is logged, though logging_steps is 10
    last, changed = {}, set()
    for record in callback.controller.history:
        shape = (record["rank"], record["width"])
        if last.get(record["layer"], shape) != shape:
            changed.add(record["step"])
        last[record["layer"]] = shape
    assert changed - {10, 20, 30, 40} and changed <= {h["step"] for h in logged}
    checkpoint = tmp_path / "checkpoint-20"
    assert (checkpoint / "inrank_controller.pt").is_file()
    assert (checkpoint / "inrank_config.json").is_file()
    saved = torch.load(checkpoint / "inrank_controller.pt", weights_only=False)
    assert saved["rank_events"] < callback.controller.rank_events  # ranks change after step 20

    resumed_model, resumed_callback = gpt2(), InRankCallback()
    resumed = trainer(resumed_model, tmp_path, resumed_callback)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert ranks(resumed_model) == final
    assert resumed_callback.controller.history == callback.controller.history
    assert math.isclose(final_loss(resumed), final_loss(run), rel_tol=1e-6), \
        (final_loss(resumed), final_loss(run))

    # A transformed model in safetensors, and back, with its ranks.
    save_transformed(model, tmp_path / "final")
    loaded = load_transformed(transformers.GPT2LMHeadModel, tmp_path / "final")
    assert ranks(loaded) == final
    ids = Tokens()[0]["input_ids"][None]
    model.eval()
    torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits)
    # and a Trainer checkpoint folder loads the same way, with the ranks it had at step 20
    at_20 = {r["layer"]: r["rank"] for r in saved["history"]}  # the last check before the save
    assert ranks(load_transformed(transformers.GPT2LMHeadModel, checkpoint)) == at_20


def test_resume_without_the_controller_state_is_a_clear_error(tmp_path):
    run = trainer(gpt2(), tmp_path, InRankCallback())
    run.args.max_steps = 20
    run.train()
    (tmp_path / "checkpoint-20" / "inrank_controller.pt").unlink()
    again = trainer(gpt2(), tmp_path, InRankCallback())
    with pytest.raises(FileNotFoundError, match="inrank_controller.pt"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-20"))


def test_example_trains_saves_reloads_and_exports(load_example, tmp_path):
    pytest.importorskip("onnxruntime")

    result = load_example("hf_trainer").main(["--quick", "--out", str(tmp_path)])
    assert result["rank_events"] > 0
    assert result["onnx_max_rel_error"] <= 1e-4
    assert (tmp_path / "final" / "model.safetensors").is_file()
