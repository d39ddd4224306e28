"""Train a transformed Hugging Face GPT-2 with transformers' Trainer, save it, load it back and
export it to ONNX.

    pip install -e ".[hf,onnx]"
    python examples/hf_trainer.py [--quick] [--out hf-run]

A small GPT-2 (random weights, byte-level vocabulary: no downloads) is trained on the standard
library's sources. `InRankCallback` adapts its ranks on the Trainer's optimizer steps, logs them
with the Trainer's logs and keeps them in its checkpoints; `save_transformed` writes the model
with save_pretrained (safetensors), `load_transformed` rebuilds it with its ranks, and `to_onnx`
exports the frozen model, verified in ONNX Runtime.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

import inrank_fx
from inrank_fx.demo.corpus import split, stdlib_corpus
from inrank_fx.export import to_onnx
from inrank_fx.integrations import InRankCallback, load_transformed, save_transformed


class Windows(torch.utils.data.Dataset):
    """Fixed windows of a byte corpus, as causal-LM examples (the model shifts the labels)."""

    def __init__(self, ids: torch.Tensor, block: int) -> None:
        self.windows = ids[: len(ids) // block * block].view(-1, block)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model for 40 steps")
    parser.add_argument("--out", type=Path, default=Path("hf-run"))
    args = parser.parse_args(argv)
    steps, n_embd, n_layer = (40, 32, 2) if args.quick else (400, 128, 4)
    block = 64

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=256,
                                        n_positions=block, bos_token_id=0, eos_token_id=0)
    config = inrank_fx.InRankConfig(init_rank=2, warmup_steps=steps // 8,
                                    check_every=steps // 8, stop_after=steps * 3 // 4)
    model = inrank_fx.transform(transformers.GPT2LMHeadModel(hf_config), config)
    train_ids, _ = split(stdlib_corpus(300_000 if args.quick else 2_000_000))

    training = transformers.TrainingArguments(
        output_dir=str(args.out), max_steps=steps, per_device_train_batch_size=16,
        learning_rate=3e-3, weight_decay=0.01, logging_steps=max(1, steps // 8),
        save_strategy="steps", save_steps=steps // 2, report_to="none", seed=0,
        disable_tqdm=True)
    callback = InRankCallback()
    trainer = transformers.Trainer(model=model, args=training,
                                   train_dataset=Windows(train_ids, block), callbacks=[callback])
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']:>4}: loss {entry['loss']:.3f}, mean rank "
                  f"{entry.get('inrank/mean_rank', float('nan')):.1f}")

    save_transformed(model, args.out / "final")
    loaded = load_transformed(transformers.GPT2LMHeadModel, args.out / "final")
    assert inrank_fx.ranks(loaded) == inrank_fx.ranks(model)
    print(f"\nsaved and reloaded {args.out / 'final'} with its ranks:\n{inrank_fx.summary(loaded)}")

    class Logits(torch.nn.Module):  # the model returns an output object; ONNX wants tensors
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids, use_cache=False).logits

    example = (torch.randint(0, 256, (1, block)),)
    report = to_onnx(Logits(loaded.eval()), example, args.out / "model.onnx")
    print(f"\n{report}")
    return {"ranks": inrank_fx.ranks(loaded), "rank_events": callback.controller.rank_events,
            "onnx_max_rel_error": report.max_rel_error}


if __name__ == "__main__":
    main()
