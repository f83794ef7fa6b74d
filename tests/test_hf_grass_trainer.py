"""The config-driven Hugging Face route: GrassTrainer / GrassTrainerMixin and grass_settings
(docs/guides/hf_trainer.md, "Which route"). Same tiny Llama and task as tests/test_hf_trainer.py.
"""

import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainingArguments  # noqa: E402

from grass_optim import GrassAdamW  # noqa: E402
from grass_optim.integrations import (  # noqa: E402
    GrassCallback,
    GrassTrainer,
    GrassTrainerMixin,
    find_grass_optimizer,
    grass_enabled,
    grass_settings,
)
from tests.test_hf_trainer import GRASS, LAYERS, LR, STEPS, VOCAB, Arithmetic, Recorder, tiny_llama  # noqa: E402

WD = 0.05
ARGS = {"max_steps": STEPS, "per_device_train_batch_size": 8, "logging_steps": 1, "report_to": [], "use_cpu": True,
        "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0, "lr_scheduler_type": "linear",
        "warmup_steps": 3, "save_strategy": "no", "learning_rate": LR, "weight_decay": WD, "adam_beta2": 0.99,
        "adam_epsilon": 1e-7}


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grass_trainer(out, grass=GRASS, model=None, resume=None, **overrides):
    rec = Recorder()
    args = TrainingArguments(output_dir=str(out), **{**ARGS, **overrides})
    trainer = GrassTrainer(model=model or tiny_llama(), args=args, train_dataset=Arithmetic(), callbacks=[rec],
                           grass=grass)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec


@pytest.fixture(scope="module")
def by_hand(tmp_path_factory):
    """The reference: GrassAdamW built by hand over the Trainer's decay / no-decay groups."""
    model = tiny_llama()
    rec = Recorder()
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("by_hand")), **ARGS)
    trainer = Trainer(model=model, args=args, train_dataset=Arithmetic(), callbacks=[rec])
    decay = set(trainer.get_decay_parameter_names(model))
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": WD},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    base = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99), eps=1e-7, fused=True)  # the Trainer's default optim
    trainer.optimizer = GrassAdamW(model, base_optimizer=base, **GRASS)
    trainer.train()
    return rec, params_of(model), find_grass_optimizer(trainer.optimizer)


def test_grass_trainer_equals_grass_adamw_by_hand(tmp_path, by_hand):
    ref, ref_params, ref_opt = by_hand
    # The same settings as a LISA-style config (aliases) plus GrassAdamW's own names.
    config = {"lisa_n_layers": 2, "lisa_step_interval": 4, "probe_steps": 2, "seed": 0}
    trainer, rec = grass_trainer(tmp_path, grass=config)
    opt = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer around it
    assert isinstance(opt, GrassAdamW)
    # the Trainer's hyperparameters and groups: decay for all but biases and norms
    hyper = {(g["initial_lr"], g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups}
    assert hyper == {(LR, (0.9, 0.99), 1e-7, WD), (LR, (0.9, 0.99), 1e-7, 0.0)}
    norms = {id(p) for n, p in trainer.model.named_parameters() if "norm" in n}
    assert all((g["weight_decay"] == 0.0) == (id(g["params"][0]) in norms) for g in opt.param_groups)
    # trains exactly like the hand-built optimizer: bit-identical losses, draws and parameters
    assert rec.losses() == ref.losses() and rec.active == ref.active
    assert all(torch.equal(p, ref_params[n]) for n, p in trainer.model.named_parameters())
    assert torch.equal(opt.importance, ref_opt.importance)
    # the callback is there, first, and logs GRASS's state
    assert isinstance(trainer.callback_handler.callbacks[0], GrassCallback)
    assert "grass/p/0" in trainer.state.log_history[-2]


def test_grass_trainer_resume_is_exact(tmp_path, by_hand):
    ref, ref_params, _ = by_hand
    k = 7
    _, saved = grass_trainer(tmp_path / "saved", save_strategy="steps", save_steps=k)
    assert saved.losses() == ref.losses()
    ckpt = tmp_path / "saved" / f"checkpoint-{k}"
    assert torch.load(ckpt / "optimizer.pt", weights_only=True)["grass"]["step"] == k
    trainer, resumed = grass_trainer(tmp_path / "resumed", model=tiny_llama(seed=1), resume=str(ckpt),
                                     save_strategy="steps", save_steps=k)
    losses = resumed.losses()
    assert sorted(losses) == list(range(k + 1, STEPS + 1))
    assert losses == {s: ref.losses()[s] for s in losses}
    assert all(resumed.active[s] == ref.active[s] for s in losses)
    assert all(torch.equal(p, ref_params[n]) for n, p in trainer.model.named_parameters())


def test_grass_trainer_base_optimizer_from_trainer(tmp_path):
    # optimizer_cls_and_kwargs names the base optimizer (plain Trainer refuses GrassAdamW there)
    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), **{**ARGS, "max_steps": 3})
    trainer = GrassTrainer(model=model, args=args, train_dataset=Arithmetic(), grass=GRASS,
                           optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}))
    opt = trainer.create_optimizer()
    assert isinstance(opt, GrassAdamW) and isinstance(opt.base_optimizer, torch.optim.SGD)
    assert trainer.create_optimizer() is opt  # once
    assert {g["momentum"] for g in opt.param_groups} == {0.9}
    # an optim that builds its own parameter set cannot be wrapped
    args = TrainingArguments(output_dir=str(tmp_path), **{**ARGS, "optim": "adafactor"})
    trainer = GrassTrainer(model=tiny_llama(), args=args, train_dataset=Arithmetic(), grass=GRASS)
    opt = trainer.create_optimizer()  # Adafactor is a torch.optim.Optimizer: wrapped
    assert type(opt.base_optimizer).__name__ == "Adafactor"
    # an optimizer that is not a torch.optim.Optimizer over the Trainer's groups is refused
    for cls_kwargs, match in [((object, {}), "Invalid optimizer_cls_and_kwargs: object is not a torch.optim"),
                              ((torch.optim.SGD, {"model": model}), "builds over its own model")]:
        trainer = GrassTrainer(model=tiny_llama(), args=args, train_dataset=Arithmetic(), grass=GRASS,
                               optimizer_cls_and_kwargs=cls_kwargs)
        with pytest.raises(ValueError, match=match):
            trainer.create_optimizer()
    # a given optimizer is used as it is
    mine = GrassAdamW(model, lr=LR, **GRASS)
    trainer = GrassTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), **ARGS),
                           train_dataset=Arithmetic(), optimizers=(mine, None))
    assert trainer.create_optimizer() is mine


def test_grass_trainer_gives_the_trainers_grad_scaler_to_the_probing_hooks(tmp_path):
    """fp16 (a GPU): the Accelerator's GradScaler exists before create_optimizer; the GrassAdamW built
    there divides its scale out of the probing hooks' sums. The CPU has no fp16 scaler: one is put in
    the Accelerator's place."""
    args = TrainingArguments(output_dir=str(tmp_path), **ARGS)
    trainer = GrassTrainer(model=tiny_llama(), args=args, train_dataset=Arithmetic(), grass=GRASS)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.accelerator.scaler = scaler
    trainer.create_optimizer()
    assert find_grass_optimizer(trainer.optimizer).grad_scaler is scaler


def test_grass_trainer_checks_settings_first(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), **ARGS)
    with pytest.raises(ValueError, match="'lisa_interval_step' is unknown .*did you mean 'lisa_interval_steps'"):
        GrassTrainer(model=tiny_llama(), args=args, train_dataset=Arithmetic(), grass={"lisa_interval_step": 5})
    with pytest.raises(ValueError, match="'learning_rate' is the optimizer's.*TrainingArguments"):
        GrassTrainer(model=tiny_llama(), args=args, train_dataset=Arithmetic(), grass={"learning_rate": 1e-3})


# --------------------------------------------------------------------------- grass_settings
def test_grass_settings_aliases_yaml_json_and_errors(tmp_path):
    pytest.importorskip("yaml")
    yaml_file = tmp_path / "grass.yaml"
    yaml_file.write_text("lisa_activated_layers: 2\nlisa_interval_steps: 20\nlisa_layers_attribute: model.layers\n"
                         "probe_steps: 5\noffload: inactive\n")
    expected = {"active_layers": 2, "switch_every": 20, "layers": "model.layers", "probe_steps": 5,
                "offload": "inactive"}
    assert grass_settings(yaml_file) == expected
    assert grass_settings(str(yaml_file)) == expected
    nested = tmp_path / "train.json"
    nested.write_text(json.dumps({"learning_rate": 1e-4, "grass": {"switch_block_every": 10, "lisa_n_layers": 1}}))
    assert grass_settings(nested, key="grass") == {"switch_every": 10, "active_layers": 1}
    assert grass_settings(None) == {} and grass_settings({"seed": None}) == {"seed": None}
    # equal duplicates are fine, conflicting ones are not
    assert grass_settings({"lisa_step_interval": 8, "switch_every": 8}) == {"switch_every": 8}
    with pytest.raises(ValueError, match="'lisa_step_interval'=8 and 'switch_block_every'=9 both set switch_every"):
        grass_settings({"lisa_step_interval": 8, "switch_block_every": 9})
    with pytest.raises(ValueError, match="did you mean 'active_layers'"):
        grass_settings({"active_layer": 2})
    with pytest.raises(ValueError, match="'weight_decay' is the optimizer's"):
        grass_settings({"weight_decay": 0.1})
    with pytest.raises(ValueError, match="Invalid switch_every: 0"):
        grass_settings({"lisa_interval_steps": 0})
    with pytest.raises(TypeError, match="Invalid active_layers: '2'"):
        grass_settings({"active_layers": "2"})
    with pytest.raises(ValueError, match="Invalid sampler: 'lisa'"):
        grass_settings({"sampler": "lisa"})
    with pytest.raises(ValueError, match="Invalid offload: 'always'"):
        grass_settings({"offload": "always"})
    with pytest.raises(ValueError, match="'grass' is not in the config"):
        grass_settings({"a": 1}, key="grass")
    bad = tmp_path / "grass.toml"
    bad.write_text("")
    with pytest.raises(ValueError, match=r"expected a \.yaml, \.yml or \.json file"):
        grass_settings(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n")
    with pytest.raises(TypeError, match="holds a list"):
        grass_settings(listing)


def test_grass_settings_on_off_switches():
    """use_grass / use_lisa / use_badam, as LMFlow's --use_lisa and LLaMA-Factory's --use_badam: they
    turn GRASS on or off and set nothing else."""
    config = {"use_lisa": True, "lisa_activated_layers": 2, "lisa_interval_steps": 20}
    assert grass_enabled(config) and grass_settings(config) == {"active_layers": 2, "switch_every": 20}
    assert grass_enabled({}) and grass_enabled(None)
    assert not grass_enabled({"use_badam": False, "switch_block_every": 5})
    assert not grass_enabled({"train": {"use_grass": False}}, key="train")
    with pytest.raises(TypeError, match="Invalid use_grass: 'yes' \\(expected true or false\\)"):
        grass_settings({"use_grass": "yes"})
    with pytest.raises(ValueError, match="the switches disagree"):
        grass_enabled({"use_grass": True, "use_lisa": False})


def test_grass_trainer_switched_off_trains_like_the_plain_trainer(tmp_path):
    """use_lisa: false in the config: the Trainer's own optimizer, no GRASS, no callback."""
    def run(cls, out, **kw):
        rec = Recorder()
        args = TrainingArguments(output_dir=str(out), **{**ARGS, "max_steps": 6})
        trainer = cls(model=tiny_llama(), args=args, train_dataset=Arithmetic(), callbacks=[rec], **kw)
        trainer.train()
        return trainer, rec

    plain, plain_rec = run(Trainer, tmp_path / "plain")
    off, off_rec = run(GrassTrainer, tmp_path / "off", grass={"use_lisa": False, "lisa_activated_layers": 2})
    assert find_grass_optimizer(off.optimizer) is None
    assert not any(isinstance(cb, GrassCallback) for cb in off.callback_handler.callbacks)
    assert off_rec.losses() == plain_rec.losses()
    assert all(torch.equal(p, q) for p, q in zip(off.model.parameters(), plain.model.parameters(), strict=True))
    on, _ = run(GrassTrainer, tmp_path / "on", grass={"use_lisa": True, **GRASS})
    assert isinstance(find_grass_optimizer(on.optimizer), GrassAdamW)


def test_grass_settings_yaml_without_pyyaml(tmp_path, monkeypatch):
    f = tmp_path / "g.yml"
    f.write_text("active_layers: 2\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    with pytest.raises(ImportError, match="needs PyYAML"):
        grass_settings(f)


# --------------------------------------------------------------------------- TRL + PEFT
def tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_sft_trainer_with_peft_trains_adapters_only(tmp_path):
    trl = pytest.importorskip("trl")
    pytest.importorskip("peft")

    class GrassSFTTrainer(GrassTrainerMixin, trl.SFTTrainer):
        pass

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig

    ids = Arithmetic(64).ids.clamp(min=2).tolist()
    data = Dataset.from_dict({"input_ids": ids})
    model = tiny_llama()
    start = params_of(model)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, logging_steps=1,
                     report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                     save_strategy="no", learning_rate=1e-2, max_length=None, packing=False)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = GrassSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer(),
                              peft_config=peft_config,
                              grass={"lisa_n_layers": 1, "lisa_step_interval": 3, "probe_steps": 2, "seed": 0,
                                     "lisa_layers_attribute": "model.layers"})
    rec = Recorder()
    trainer.add_callback(rec)
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, GrassAdamW) and opt.num_steps == 12
    # built on the PeftModel: only the adapters are in it, the blocks named through the base model
    assert opt.layer_names == tuple(f"base_model.model.model.layers.{i}" for i in range(LAYERS))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    named = dict(trainer.model.named_parameters())
    assert in_opt == {id(p) for n, p in named.items() if "lora_" in n}
    # base weights bit-identical to the start; adapters of several blocks changed
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in named.items()
            if "lora_" not in n}
    assert set(base) == set(start) and all(torch.equal(p, start[n]) for n, p in base.items())
    trained = {int(n.split(".layers.")[1].split(".")[0]) for n, p in named.items()
               if "lora_B" in n and p.abs().sum() > 0}  # lora_B starts at zero
    drawn = {b for probing, active in rec.active.values() if not probing for b in active}
    assert trained == drawn and len(drawn) >= 2
    assert all(len(active) == 1 for probing, active in rec.active.values() if not probing)


# --------------------------------------------------------------------------- the example
def test_example_hf_config_quick(monkeypatch, capsys):
    """examples/hf_config.py --quick (--sft), run in this process: the imports are already paid for."""
    pytest.importorskip("yaml")
    args = ["--quick"] + (["--sft"] if all(map(importlib.util.find_spec, ("trl", "peft"))) else [])
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["hf_config.py", *args])
    runpy.run_path(str(root / "examples" / "hf_config.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "GRASS settings from grass.yaml: {'active_layers': 2, 'switch_every': 10, 'layers': 'model.layers'" in out
    assert "Trainer: 30 steps" in out and "base AdamW" in out, out
    if "--sft" in args:
        assert "SFTTrainer + LoRA: 30 steps" in out and "base_model.model.model.layers.0" in out, out
        assert "base weights unchanged: True" in out, out
