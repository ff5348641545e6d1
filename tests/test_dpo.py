"""`dynact dpo` and the Hugging Face front door, through the real libraries (transformers,
TRL's SFTTrainer and DPOTrainer, tokenizers), on a tiny GPT-2 with a tokenizer trained here."""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ARMS = ["gelu", "crrelu", "eafo"]
# A few optimizer steps per run, the activation optimiser acting every 2.
TINY = ["--sft-steps", "4", "--dpo-steps", "4", "--eval-every", "2", "--every-n-steps", "2", "--eval-rows", "16",
        "--batch-size", "16", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _main(*argv: str) -> int:
    from dynact.experiments.dpo.command import main

    return main(list(argv))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "out"
    assert _main(*TINY, "--arms", ",".join(ARMS), "--betas", "0.5", "--seeds", "1", "--out", str(out)) == 0
    return out, json.loads((out / "results.json").read_text())


# --------------------------------------------------------------------------- the activation swap
def test_gpt2_small_with_crrelu_or_eafo_has_exactly_12_more_parameters():
    from transformers import GPT2Config, GPT2LMHeadModel

    from dynact import swap_activations
    from dynact.experiments.dpo.models import gelu_types

    with torch.device("meta"):  # GPT-2 small's shapes without allocating its weights
        model = GPT2LMHeadModel(GPT2Config())
    assert model.num_parameters() == 124_439_808
    assert len(swap_activations(model, "gelu_new", "crrelu")) == 12  # the name works once transformers is loaded
    assert model.num_parameters() == 124_439_808 + 12
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    swap_activations(model, gelu_types(), "eafo", base="gelu_new")
    assert model.num_parameters() == 124_439_808 + 12


def test_gpt2_gelu_is_found_and_converted_keeping_its_tanh_approximation():
    from transformers.activations import NewGELUActivation

    from dynact.activations import activation_types, find_activations
    from dynact.experiments.dpo.models import build_policy, train_tokenizer
    from dynact.integrations.transformers import EAFOTrainerCallback
    from dynact.spline import EAFOActivation

    assert activation_types()[NewGELUActivation] == "gelu_new"
    tok = train_tokenizer(["a tiny corpus for a tiny tokenizer"] * 4, vocab_size=300)
    model = build_policy("tiny", "gelu", tok, seed=0)
    names = [n for n, _ in find_activations(model)]
    assert names == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    callback = EAFOTrainerCallback(model, every_n_steps=2, mode="refresh", convert=(NewGELUActivation,))
    assert callback.layer_names == names
    act = model.get_submodule(names[0])
    assert isinstance(act, EAFOActivation) and isinstance(act.base, NewGELUActivation)
    x = torch.linspace(-5, 5, 201)
    with torch.no_grad():
        act.s.zero_()  # the spline off: the base alone, tanh-approximate like GPT-2's
        assert torch.allclose(act(x), NewGELUActivation()(x), atol=1e-6)
        assert not torch.allclose(act(x), torch.nn.functional.gelu(x), atol=1e-5)


def test_crrelu_arm_swaps_every_mlp_activation():
    from dynact import CRReLU
    from dynact.experiments.dpo.models import build_policy, train_tokenizer

    tok = train_tokenizer(["another tiny corpus"] * 4, vocab_size=300)
    model = build_policy("tiny", "crrelu", tok, seed=0)
    acts = [m for n, m in model.named_modules() if n.endswith("mlp.act")]
    assert len(acts) == 2 and all(isinstance(m, CRReLU) for m in acts)


# --------------------------------------------------------------------------- the sweep
def test_sweep_runs_sft_then_dpo_for_each_arm_with_finite_logged_figures(sweep):
    out, results = sweep
    runs = {r["arm"]: r for r in results["runs"]}
    assert set(runs) == set(ARMS)
    for arm, rec in runs.items():
        assert rec["status"] == "ok", rec.get("error")
        assert rec["sft"]["steps"] == 4 and rec["steps"] == 4
        for key in ("eval_margin", "eval_accuracy", "eval_loss"):
            assert math.isfinite(rec[key]), (arm, key)
        assert 0.0 <= rec["eval_accuracy"] <= 1.0
        assert [p["step"] for p in rec["eval_curve"]] == [2, 4]
        # every arm is measured: the per-layer entropy figures of both MLP activations
        assert sorted(rec["layers"]) == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
        for figures in rec["layers"].values():
            assert {"dead", "entropy", "entropy_scale_free", "log_slope", "std"} <= set(figures)
    # one learnable eps per layer for crrelu and eafo
    assert runs["crrelu"]["params"] == runs["gelu"]["params"] + 2 == runs["eafo"]["params"]
    # the eafo arm's activations were updated, in SFT and in DPO; the static arms' never
    assert runs["eafo"]["accepted_updates"] > 0 and runs["eafo"]["sft"]["accepted_updates"] > 0
    assert runs["gelu"]["accepted_updates"] == runs["crrelu"]["accepted_updates"] == 0


def test_sweep_logs_dpo_and_layer_figures_to_one_tensorboard_run_per_arm_beta_seed(sweep):
    out, results = sweep
    for arm in ARMS:
        run = out / arm / "beta0.5" / "seed0"
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"eval/rewards/margins", "eval/rewards/accuracies", "eval/loss", "train/loss"} <= tags, arm
        assert any(t.startswith("train/entropy_scale_free/transformer.h.0") or
                   t.startswith("entropy_scale_free/transformer.h.0") for t in tags), sorted(tags)
        assert list((out / arm / "sft" / "seed0").glob("events.out.tfevents.*"))


def test_sweep_writes_table4_report_results_and_plots(sweep):
    out, results = sweep
    report = (out / "report.md").read_text()
    for text in ("| β | activation | eval reward margin | eval accuracy | eval loss | seeds |", "| 0.5 | CRReLU |",
                 "Δ eval reward margin [95% CI]", "entropy_scale_free", "| EAFO (dynamic, GELU base) |"):
        assert text in report
    for png in ("metrics_vs_beta.png", "layers.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    cell = results["summary"]["crrelu@0.5"]
    assert cell["n"] == 1 and cell["delta"]["eval_margin"]["n"] == 1
    rec = results["runs"][1]
    assert cell["delta"]["eval_loss"]["mean"] == pytest.approx(
        rec["eval_loss"] - results["runs"][0]["eval_loss"])
    assert not (out / "sft").exists()  # SFT models are dropped once every beta is done


def test_resume_skips_finished_runs_and_runs_only_new_ones(sweep, tmp_path):
    out, _ = sweep
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert _main(*TINY, "--arms", "gelu", "--betas", "0.5,1", "--seeds", "1", "--out", str(out), "--resume") == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert {k: after[k] for k in before} == before  # finished runs untouched
    assert set(after) - set(before) == {"gelu-beta1-seed0.json"}
    results = json.loads((out / "results.json").read_text())
    assert [(r["arm"], r["beta"]) for r in results["runs"]] == [("gelu", 0.5), ("gelu", 1.0)]
    # other settings in the same folder are refused
    with pytest.raises(SystemExit) as exc:
        _main(*TINY, "--lr", "0.1", "--arms", "gelu", "--seeds", "1", "--out", str(out), "--resume")
    assert exc.value.code == 2


# --------------------------------------------------------------------------- the callback in a plain Trainer
def _lm_trainer(model, out: Path, steps: int, callback, save: bool):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, 300, (32, 12), generator=g)]
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
                             report_to=[], use_cpu=True, save_strategy="steps" if save else "no", save_steps=2,
                             logging_steps=1, disable_tqdm=True, seed=0, gradient_accumulation_steps=2)
    return Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])


def test_callback_steps_per_optimizer_step_logs_layers_and_resumes_from_checkpoints(tmp_path):
    from transformers.activations import NewGELUActivation

    from dynact.experiments.dpo.models import build_policy, train_tokenizer
    from dynact.integrations.transformers import STATE_FILE, EAFOTrainerCallback

    tok = train_tokenizer([" ".join(map(str, range(400)))] * 2, vocab_size=300)

    def fresh():
        model = build_policy("tiny", "gelu", tok, seed=0)
        return model, EAFOTrainerCallback(model, every_n_steps=2, window=2, convert=(NewGELUActivation,))

    model, callback = fresh()
    trainer = _lm_trainer(model, tmp_path / "a", 4, callback, save=True)
    trainer.train()
    # gradient accumulation 2: 4 optimizer steps, updates after steps 2 and 4, in the history
    rows = [r for r in trainer.state.log_history if "entropy_scale_free/transformer.h.1.mlp.act" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(math.isfinite(r["entropy_scale_free/transformer.h.1.mlp.act"]) for r in rows)
    assert any(r.get("accepted/transformer.h.0.mlp.act") == 1 for r in rows)
    assert (tmp_path / "a" / "checkpoint-2" / STATE_FILE).is_file()
    assert not model.transformer.h[0].mlp.act._forward_pre_hooks  # hooks gone at train end
    full = [model.get_submodule(n).s.clone() for n in callback.layer_names]
    from dynact.spline import EAFOActivation

    assert not torch.allclose(full[0], EAFOActivation(base="gelu_new").s, atol=1e-4)  # the spline was refreshed

    # resumed at step 2: the same run as without the interruption
    model2, callback2 = fresh()
    trainer2 = _lm_trainer(model2, tmp_path / "a", 4, callback2, save=False)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    resumed = [model2.get_submodule(n).s for n in callback2.layer_names]
    for a, b in zip(full, resumed, strict=False):
        assert torch.allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------- bad input, before training
def _refused(capsys, tmp_path, *argv: str) -> str:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        _main(*TINY, "--out", str(out), *argv)
    assert exc.value.code == 2
    assert not (out / "runs").exists()  # nothing was trained or recorded
    return capsys.readouterr().err


def test_unknown_data_set_is_refused(capsys, tmp_path):
    assert "unknown data set" in _refused(capsys, tmp_path, "--data", "imdb")


def test_jsonl_without_chosen_is_refused_naming_row_and_column(capsys, tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go"}) + "\n"
                    + json.dumps({"prompt": "\n\nHuman: yo\n\nAssistant:", "rejected": " no"}) + "\n")
    err = _refused(capsys, tmp_path, "--data", str(path))
    assert "row 1 has no column 'chosen'" in err


def test_non_positive_beta_is_refused(capsys, tmp_path):
    assert "beta must be a finite number > 0" in _refused(capsys, tmp_path, "--betas", "0.1,0")
    assert "beta must be a finite number > 0" in _refused(capsys, tmp_path, "--betas", "-1")


def test_unknown_arm_is_refused(capsys, tmp_path):
    err = _refused(capsys, tmp_path, "--arms", "gelu,swishy")
    assert "unknown arm 'swishy'" in err and "crrelu" in err


def test_empty_response_and_long_prompt_are_named():
    from dynact.experiments.dpo.data import check_rows, fit_prompts
    from dynact.experiments.dpo.models import train_tokenizer

    with pytest.raises(ValueError, match=r"row 0, column 'rejected' is empty"):
        check_rows([{"prompt": "p", "chosen": "yes", "rejected": "  "}], "x.jsonl")
    with pytest.raises(ValueError, match=r"row 0, column 'chosen' is a int"):
        check_rows([{"prompt": "p", "chosen": 3, "rejected": "no"}], "x.jsonl")
    tok = train_tokenizer(["word " * 50] * 2, vocab_size=280)
    rows = [{"prompt": "short", "chosen": "a", "rejected": "b"},
            {"prompt": "word " * 40, "chosen": "a", "rejected": "b"}]
    with pytest.raises(ValueError, match=r"row 1, column 'prompt' has \d+ tokens, over the limit of 8"):
        fit_prompts(rows, tok, 8, truncate=False, source="x.jsonl")
    cut = fit_prompts(rows, tok, 8, truncate=True, source="x.jsonl")
    assert len(tok(cut[1]["prompt"])["input_ids"]) <= 8 and cut[1]["prompt"].endswith("word ")


def test_offline_preferences_are_deterministic_and_well_formed():
    from dynact.experiments.dpo.data import check_rows, offline_preferences

    rows = offline_preferences(50)
    assert rows == offline_preferences(50) and check_rows(rows, "offline") == rows
    assert all(r["prompt"].endswith("\n\nAssistant:") and r["chosen"] != r["rejected"] for r in rows)


def test_jsonl_in_hh_form_is_read_and_split(tmp_path):
    from dynact.experiments.dpo.data import load_preferences, offline_preferences

    rows = offline_preferences(20, seed=3)
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line is allowed
    train, evals = load_preferences(str(path), eval_fraction=0.25)
    assert len(train) == 15 and len(evals) == 5
    assert sorted(map(json.dumps, train + evals)) == sorted(map(json.dumps, rows))


def test_callback_without_model_converts_at_trainer_init_before_the_optimizer(tmp_path):
    from transformers.activations import NewGELUActivation

    from dynact.experiments.dpo.models import build_policy, train_tokenizer
    from dynact.integrations.transformers import EAFOTrainerCallback
    from dynact.spline import EAFOActivation

    tok = train_tokenizer(["one two three four"] * 4, vocab_size=300)
    model = build_policy("tiny", "gelu", tok, seed=0)
    callback = EAFOTrainerCallback(every_n_steps=2, convert=(NewGELUActivation,))
    trainer = _lm_trainer(model, tmp_path, 1, callback, save=False)
    act = model.transformer.h[1].mlp.act
    assert isinstance(act, EAFOActivation) and callback.layer_names == ["transformer.h.0.mlp.act",
                                                                         "transformer.h.1.mlp.act"]
    trained = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert id(act.eps) in trained  # the new eps is trained


def test_callback_figures_reach_report_to_tensorboard_with_callbacks_eafo_alone(tmp_path, monkeypatch):
    """report_to's TensorBoardCallback is registered before the user's callbacks; the figures still reach it."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import ProgressCallback

    from dynact.integrations.transformers import EAFOTrainerCallback

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    eafo = EAFOTrainerCallback(model, every_n_steps=2, window=2, convert=("gelu_new",))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, 64, (16, 12), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to="tensorboard", use_cpu=True, save_strategy="no", logging_steps=1,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[eafo])
    order = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert order.index(EAFOTrainerCallback) < order.index(TensorBoardCallback)  # moved at init, not by the user
    trainer.add_callback(ProgressCallback)  # a log reader added after init: passed at on_train_begin
    trainer.train()
    order = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert order.index(EAFOTrainerCallback) < min(order.index(TensorBoardCallback), order.index(ProgressCallback))
    assert order.count(EAFOTrainerCallback) == 1

    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    layers = ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    for layer in layers:
        for metric in ("entropy_scale_free", "dead", "eps", "accepted"):
            assert f"train/{metric}/{layer}" in tags, sorted(tags)
    # updates after optimizer steps 2 and 4, the same values as in the Trainer's history
    tag = f"train/entropy_scale_free/{layers[1]}"
    written = {e.step: e.value for e in acc.Scalars(tag)}
    history = {r["step"]: r[f"entropy_scale_free/{layers[1]}"] for r in trainer.state.log_history
               if f"entropy_scale_free/{layers[1]}" in r}
    assert sorted(written) == sorted(history) == [2, 4]
    for step, value in history.items():
        assert written[step] == pytest.approx(value, rel=1e-6)
    assert "train/loss" in tags  # the Trainer's own figures are still there
