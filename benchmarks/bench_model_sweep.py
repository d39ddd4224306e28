"""Models nobody here wrote: the pass over a few dozen torchvision, timm and transformers models.

    python benchmarks/bench_model_sweep.py [--models NAME ...] [--no-onnx] [--json FILE]
                                           [--markdown FILE] [--timeout 600]

Every model is built from its library's config with random weights (no downloads) and run on a
small input, each in a fresh process (a crash or a hang is that model's failure, not the
sweep's). The columns:

  factored   layers factored at full rank / weights left dense (`summary`)
  coverage   share of the weight-matmul FLOPs factored (`summary(model, inputs).flops.share`)
  parity     output relative error of the full-rank transform against the dense model
  train      one AdamW step at 25% rank with a rank check (attach, every layer may grow)
  freeze     the 25% model frozen (`freeze`) against the unfrozen one (rel. error)
  export     torch.export of the 25% model and of its frozen form ("ok"), or what failed, with
             the dense model tried too ("dense fails too")
  onnx       the frozen 25% model through `to_onnx` (ONNX Runtime parity; "TS": written by
             torch.onnx's TorchScript exporter, where the dynamo one could not translate the
             graph) — or why not, with the dense model tried too ("dense fails too": torch's
             limit, not ours)

A failed column holds the error's first line. Needs the `[test]` extra (timm, torchvision,
transformers); models of a library that is missing are skipped. About 25 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# name: (library, builder, input kind). Builders take no arguments and return (model, inputs).
IMAGE = 64  # input side for convolutional models; transformers for images take theirs


def _tv(name, size=IMAGE):
    def build():
        import torch
        import torchvision

        model = getattr(torchvision.models, name)()
        return model, (torch.randn(1, 3, size, size),)
    return build


def _timm(name, size=IMAGE):
    def build():
        import timm
        import torch

        return timm.create_model(name), (torch.randn(1, 3, size, size),)
    return build


def _hf(config_name, model_name, inputs="tokens", **config):
    def build():
        import torch
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        model = getattr(transformers, model_name)(cfg)
        if inputs == "tokens":
            return model, (torch.randint(0, 256, (1, 16)),)
        if inputs == "seq2seq":
            ids = torch.randint(0, 256, (1, 16))
            # input_ids, attention_mask, decoder_input_ids
            return model, (ids, torch.ones_like(ids), ids[:, :8])
        return model, (torch.randn(1, 3, config.get("image_size", 32), config.get("image_size", 32)),)
    return build


def _hf_audio(config_name, model_name, seq2seq=False, **config):
    """A speech model on 0.1 s of 16 kHz audio (or, with `seq2seq`, Whisper's log-mel frames
    and decoder tokens, through a wrapper that names them)."""
    def build():
        import torch
        import transformers

        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
        if not seq2seq:
            return model, (torch.randn(1, 1600),)
        frames = 2 * config["max_source_positions"]
        return (SpeechToText(model),
                (torch.randn(1, config["num_mel_bins"], frames), torch.randint(0, 256, (1, 8))))
    return build


def _hf_clip(**config):
    def build():
        import torch
        import transformers

        model = transformers.CLIPModel(transformers.CLIPConfig(**config))
        return model, (torch.randint(0, 256, (1, 16)), torch.randn(1, 3, 32, 32))
    return build


class SpeechToText:  # made an nn.Module on first use (torch is imported lazily)
    def __new__(cls, model):
        import torch

        class SpeechToText(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, features, decoder_ids):
                return self.model(input_features=features,
                                  decoder_input_ids=decoder_ids).last_hidden_state

        return SpeechToText(model)


TINY = dict(vocab_size=256, use_cache=False)  # no key/value cache in the outputs (export)
SPEECH = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=32)
DECODER = dict(TINY, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

MODELS = {
    # torchvision
    "resnet18": ("torchvision", _tv("resnet18")),
    "resnet50": ("torchvision", _tv("resnet50")),
    "mobilenet_v2": ("torchvision", _tv("mobilenet_v2")),
    "mobilenet_v3_small": ("torchvision", _tv("mobilenet_v3_small")),
    "efficientnet_b0": ("torchvision", _tv("efficientnet_b0")),
    "regnet_y_400mf": ("torchvision", _tv("regnet_y_400mf")),
    "shufflenet_v2_x0_5": ("torchvision", _tv("shufflenet_v2_x0_5")),
    "squeezenet1_1": ("torchvision", _tv("squeezenet1_1")),
    "mnasnet0_5": ("torchvision", _tv("mnasnet0_5")),
    "convnext_tiny": ("torchvision", _tv("convnext_tiny")),
    "swin_t": ("torchvision", _tv("swin_t")),
    "vit_b_16": ("torchvision", _tv("vit_b_16", 224)),
    # timm
    "vit_tiny_patch16_224": ("timm", _timm("vit_tiny_patch16_224", 224)),
    "deit_tiny_patch16_224": ("timm", _timm("deit_tiny_patch16_224", 224)),
    "convnext_atto": ("timm", _timm("convnext_atto")),
    "resnet10t": ("timm", _timm("resnet10t")),
    "mobilevit_xxs": ("timm", _timm("mobilevit_xxs", 256)),
    "levit_128s": ("timm", _timm("levit_128s", 224)),
    "efficientformer_l1": ("timm", _timm("efficientformer_l1", 224)),
    "poolformer_s12": ("timm", _timm("poolformer_s12")),
    "edgenext_xx_small": ("timm", _timm("edgenext_xx_small")),
    "mixer_s16_224": ("timm", _timm("mixer_s16_224", 224)),
    "lcnet_050": ("timm", _timm("lcnet_050")),
    "tiny_vit_5m_224": ("timm", _timm("tiny_vit_5m_224", 224)),
    # transformers
    "gpt2": ("transformers", _hf("GPT2Config", "GPT2LMHeadModel", n_layer=2, n_embd=64, n_head=4,
                                 n_positions=64, **TINY)),
    "bert": ("transformers", _hf("BertConfig", "BertModel", num_hidden_layers=2, hidden_size=64,
                                 num_attention_heads=4, intermediate_size=128,
                                 max_position_embeddings=64, **TINY)),
    "distilbert": ("transformers", _hf("DistilBertConfig", "DistilBertModel", n_layers=2, dim=64,
                                       n_heads=4, hidden_dim=128, max_position_embeddings=64,
                                       **TINY)),
    "roberta": ("transformers", _hf("RobertaConfig", "RobertaModel", num_hidden_layers=2,
                                    hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                    max_position_embeddings=72, **TINY)),
    "llama": ("transformers", _hf("LlamaConfig", "LlamaForCausalLM", **DECODER)),
    "mistral": ("transformers", _hf("MistralConfig", "MistralForCausalLM", **DECODER)),
    "qwen2": ("transformers", _hf("Qwen2Config", "Qwen2ForCausalLM", **DECODER)),
    "opt": ("transformers", _hf("OPTConfig", "OPTForCausalLM", hidden_size=64, ffn_dim=128,
                                num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=64, word_embed_proj_dim=64, **TINY)),
    "gpt_neo": ("transformers", _hf("GPTNeoConfig", "GPTNeoForCausalLM", hidden_size=64,
                                    num_layers=2, num_heads=4, attention_types=[[["global"], 2]],
                                    max_position_embeddings=64, **TINY)),
    "phi": ("transformers", _hf("PhiConfig", "PhiForCausalLM", **DECODER)),
    "t5": ("transformers", _hf("T5Config", "T5ForConditionalGeneration", "seq2seq", d_model=64,
                               d_ff=128, d_kv=16, num_layers=2, num_heads=4, **TINY)),
    "bart": ("transformers", _hf("BartConfig", "BartForConditionalGeneration", "seq2seq",
                                 d_model=64, encoder_layers=2, decoder_layers=2,
                                 encoder_attention_heads=4, decoder_attention_heads=4,
                                 encoder_ffn_dim=128, decoder_ffn_dim=128,
                                 max_position_embeddings=64, **TINY)),
    "mixtral": ("transformers", _hf("MixtralConfig", "MixtralForCausalLM", num_local_experts=4,
                                    num_experts_per_tok=2, **DECODER)),
    "vit_hf": ("transformers", _hf("ViTConfig", "ViTModel", "image", image_size=32, patch_size=8,
                                   hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128)),
    # issue 29: kinds the sweep lacked. timm: relative-position attention, cross-attention,
    # hierarchical ViTs, heads in ModuleLists (efficientvit's cascaded group attention)
    "swinv2_tiny_window8_256": ("timm", _timm("swinv2_tiny_window8_256", 256)),
    "crossvit_tiny_240": ("timm", _timm("crossvit_tiny_240", 240)),
    "pvt_v2_b0": ("timm", _timm("pvt_v2_b0", 224)),
    "twins_svt_small": ("timm", _timm("twins_svt_small", 224)),
    "maxvit_nano_rw_256": ("timm", _timm("maxvit_nano_rw_256", 256)),
    "coat_lite_tiny": ("timm", _timm("coat_lite_tiny", 224)),
    "cait_xxs24_224": ("timm", _timm("cait_xxs24_224", 224)),
    "xcit_nano_12_p16_224": ("timm", _timm("xcit_nano_12_p16_224", 224)),
    "hiera_tiny_224": ("timm", _timm("hiera_tiny_224", 224)),
    "efficientvit_m0": ("timm", _timm("efficientvit_m0", 224)),
    "gcvit_xxtiny": ("timm", _timm("gcvit_xxtiny", 224)),
    "fastvit_t8": ("timm", _timm("fastvit_t8", 256)),
    "convit_tiny": ("timm", _timm("convit_tiny", 224)),
    "mvitv2_tiny": ("timm", _timm("mvitv2_tiny", 224)),
    "nest_tiny": ("timm", _timm("nest_tiny", 224)),
    "volo_d1_224": ("timm", _timm("volo_d1_224", 224)),
    # transformers: relative positions, speech encoders, two towers, more mixtures of experts
    "deberta_v2": ("transformers", _hf("DebertaV2Config", "DebertaV2Model", num_hidden_layers=2,
                                       hidden_size=64, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=64,
                                       relative_attention=True, pos_att_type=["p2c", "c2p"],
                                       vocab_size=256)),
    "wav2vec2": ("transformers", _hf_audio("Wav2Vec2Config", "Wav2Vec2Model", **SPEECH)),
    "hubert": ("transformers", _hf_audio("HubertConfig", "HubertModel", **SPEECH)),
    "whisper": ("transformers", _hf_audio(
        "WhisperConfig", "WhisperModel", seq2seq=True, d_model=64, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32,
        max_target_positions=32, decoder_start_token_id=0, pad_token_id=0, bos_token_id=0,
        eos_token_id=0, **TINY)),
    "clip": ("transformers", _hf_clip(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=256, max_position_embeddings=32),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=32)),
    "dinov2": ("transformers", _hf("Dinov2Config", "Dinov2Model", "image", hidden_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                   image_size=32, patch_size=8)),
    "gemma": ("transformers", _hf("GemmaConfig", "GemmaForCausalLM", head_dim=16, **DECODER)),
    "falcon": ("transformers", _hf("FalconConfig", "FalconForCausalLM", hidden_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, **TINY)),
    "qwen2_moe": ("transformers", _hf("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=64,
                                      shared_expert_intermediate_size=64, **DECODER)),
    "granitemoe": ("transformers", _hf("GraniteMoeConfig", "GraniteMoeForCausalLM",
                                       num_local_experts=4, num_experts_per_tok=2, **DECODER)),
    "olmoe": ("transformers", _hf("OlmoeConfig", "OlmoeForCausalLM", num_experts=4,
                                  num_experts_per_tok=2, **DECODER)),
    "qwen3_moe": ("transformers", _hf("Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=64,
                                      head_dim=16, **DECODER)),
    "phimoe": ("transformers", _hf("PhimoeConfig", "PhimoeForCausalLM", num_local_experts=4,
                                   num_experts_per_tok=2, **DECODER)),
    "switch_transformers": ("transformers", _hf(
        "SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration", "seq2seq",
        d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, decoder_start_token_id=0, **TINY)),
}
# Transformed with example_inputs: swin_t hands weights to a torch.fx.wrap'd function; the
# mixtures of experts here take the torch.export frontend where fx cannot trace their loops.
CAPTURE = {"swin_t", "olmoe", "qwen3_moe", "phimoe"}
COLUMNS = ("factored", "coverage", "parity", "train", "freeze", "export", "onnx")


def first_tensor(output):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        if getattr(output, key, None) is not None:
            return getattr(output, key)
    return output[0]


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text[:160]


def sweep_one(name: str, onnx: bool) -> dict:
    """Every column for one model, in this process; a column's failure is recorded, not raised."""
    import torch

    import inrank_fx
    from inrank_fx import InRankConfig

    _, build = MODELS[name]
    torch.manual_seed(0)
    record: dict = {"model": name}
    started = time.perf_counter()

    def transform(model, config, inputs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return inrank_fx.transform(model, config,
                                       example_inputs=inputs if name in CAPTURE else None)

    try:
        model, inputs = build()
        model.eval()
        with torch.no_grad():  # zero-initialised heads (torchvision's ViT, timm's Mixer) would
            for p in model.parameters():  # make every output zero and parity meaningless
                if p.dim() >= 2 and p.count_nonzero() == 0:
                    torch.nn.init.normal_(p, std=0.02)
        with torch.no_grad():
            reference = first_tensor(model(*inputs))
    except Exception as error:  # the library's own model did not build or run
        return {**record, "error": f"does not build/run dense: {short(error)}"}
    record["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6

    try:  # factored, coverage, parity: the full-rank transform
        full = transform(model, InRankConfig(init="svd", init_rank=1.0, buffer=0, min_features=1),
                         inputs).eval()
        report = inrank_fx.summary(full, inputs)
        record["factored"] = f"{len(report.layers)} / {len(report.dense)} dense"
        record["dense_reasons"] = sorted({d.reason.split(":")[0][:80] for d in report.dense})
        record["coverage"] = report.flops.share
        with torch.no_grad():
            record["parity"] = rel_err(first_tensor(full(*inputs)), reference)
    except Exception as error:
        record["factored"] = short(error)

    quarter = None
    try:  # train: a step at 25% rank with a rank check at that step
        quarter = transform(model, InRankConfig(init="svd", init_rank=0.25, buffer=0.05), inputs)
        before = inrank_fx.ranks(quarter)
        opt = torch.optim.AdamW(quarter.parameters(), lr=1e-4)
        ctrl = inrank_fx.attach(quarter, opt, InRankConfig(warmup_steps=0, check_every=1,
                                                           measure="update", threshold=0.999,
                                                           stop_after=None))
        loss = first_tensor(quarter(*inputs)).float().pow(2).mean()
        loss.backward()
        opt.step()
        ctrl.detach()
        changed = sum(inrank_fx.ranks(quarter)[n] != r for n, r in before.items())
        record["train"] = (f"ok, {changed}/{len(before)} ranks moved" if torch.isfinite(loss)
                           else "non-finite loss")
    except Exception as error:
        record["train"] = short(error)
        quarter = None

    frozen = None
    try:  # freeze below full rank
        quarter = transform(model, InRankConfig(init="svd", init_rank=0.25, buffer=0),
                            inputs).eval()
        frozen = inrank_fx.freeze(quarter)
        with torch.no_grad():
            record["freeze"] = rel_err(first_tensor(frozen(*inputs)),
                                       first_tensor(quarter(*inputs)))
    except Exception as error:
        record["freeze"] = short(error)

    if quarter is not None:
        record["export"] = exports(model, {"factored": quarter, "frozen": frozen}, inputs)

    if onnx and quarter is not None:
        from inrank_fx.export import to_onnx

        with tempfile.TemporaryDirectory() as folder:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a fallback exporter is in the record
                    result = to_onnx(quarter, inputs, Path(folder) / "model.onnx")
                record["onnx"] = result.max_rel_error
                record["onnx_exporter"] = result.exporter
            except Exception as error:
                try:
                    to_onnx(model, inputs, Path(folder) / "dense.onnx", verify=False)
                    record["onnx"] = short(error)
                except Exception:
                    record["onnx"] = f"dense fails too ({short(error)[:60]})"
    record["seconds"] = time.perf_counter() - started
    return record


def exports(dense, models: dict, inputs) -> str:
    """torch.export of the 25% factored model and of its frozen form: "ok", or what failed,
    with the dense model tried too ("dense fails too": torch's limit, not ours)."""
    import torch

    failed = []
    for label, model in models.items():
        if model is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.export.export(model, inputs, strict=False)
        except Exception as error:
            failed.append(f"{label}: {short(error)[:100]}")
    if not failed:
        return "ok"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.export(dense, inputs, strict=False)
    except Exception as error:
        return f"dense fails too ({short(error)[:60]})"
    return "; ".join(failed)


def run_isolated(name: str, onnx: bool, timeout_s: float) -> dict:
    cmd = [sys.executable, __file__, "--_one", name] + ([] if onnx else ["--no-onnx"])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"timed out after {timeout_s:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "error": f"crashed: {tail[:160]}"}
    return json.loads(lines[-1])


def cell(value, kind: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if kind == "coverage":
        return f"{value:.0%}"
    if kind == "export":
        return str(value)
    return f"{value:.1e}"


def table(records: list[dict], markdown: bool = False) -> str:
    from inrank_fx._table import format_table

    header = ["model", "library", "params (M)", *COLUMNS]
    rows = []
    for r in records:
        library = MODELS[r["model"]][0]
        if "error" in r:
            rows.append([r["model"], library, "-", r["error"], *[""] * (len(COLUMNS) - 1)])
            continue
        cells = [cell(r.get(c), c) for c in COLUMNS]
        if r.get("onnx_exporter") == "torchscript":
            cells[-1] += " (TS)"
        rows.append([r["model"], library, f"{r['params_m']:.1f}", *cells])
    if not markdown:
        return format_table(header, rows, left=3)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX column")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model")
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--markdown", help="write the table as markdown to this file")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._one:
        print(json.dumps(sweep_one(args._one, onnx=not args.no_onnx)))
        return 0
    records = []
    for name in args.models:
        records.append(run_isolated(name, not args.no_onnx, args.timeout))
        print(f"{name}: {records[-1]}", file=sys.stderr, flush=True)
    print(table(records))
    from inrank_fx._io import atomic_destination

    for path, text in ((args.json, json.dumps(records, indent=1)),
                       (args.markdown, table(records, markdown=True) + "\n")):
        if path:
            with atomic_destination(Path(path)) as tmp:
                tmp.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
