"""GrassAdamW under the Hugging Face Trainer, and grass_optim.integrations (see docs/guides/hf_trainer.md).

A 4-block LlamaForCausalLM (hidden 32, vocab 64) built from a config, on a deterministic synthetic
token task, on the CPU: every Trainer run takes about a second.
"""

import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_scheduler,
)

from grass_optim import GrassAdamW  # noqa: E402
from grass_optim.integrations import GrassCallback, add_grass_callback, find_grass_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, LAYERS = 64, 16, 4
LR = 1e-2
STEPS = 16
GRASS = {"active_layers": 2, "switch_every": 4, "probe_steps": 2, "seed": 0}  # redraws after steps 2, 6, 10, 14


class Arithmetic(torch.utils.data.Dataset):
    """Sequences ``a, a+d, a+2d, ... (mod VOCAB)``: the next token is learnable in context."""

    def __init__(self, n=256, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


class Recorder(TrainerCallback):
    """Per optimizer step: the lrs of all groups and the blocks it trains; per log: the logs."""

    def __init__(self):
        self.lrs, self.active, self.logs = {}, {}, []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = find_grass_optimizer(optimizer)
        step = state.global_step + 1  # the step about to be taken
        self.lrs[step] = [g["lr"] for g in optimizer.param_groups]
        if opt is not None:
            self.active[step] = (opt.is_probing, opt.active_layer_indices)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))

    def losses(self):
        return {step: logs["loss"] for step, logs in self.logs if "loss" in logs}


def train(out, *, steps=STEPS, model=None, opt=None, resume=None, grass_callback=None, per_block=True,
          **args_kwargs):
    """One Trainer run; returns (trainer, optimizer, recorder)."""
    model = tiny_llama() if model is None else model
    opt = GrassAdamW(model, lr=LR, **GRASS) if opt is None else opt
    rec = Recorder()
    kwargs = {"lr_scheduler_type": "linear", "warmup_steps": 3, "save_strategy": "no", **args_kwargs}
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, logging_steps=1, report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0, **kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=Arithmetic(), optimizers=(opt, None), callbacks=[rec])
    if grass_callback == "first":
        add_grass_callback(trainer, per_block=per_block)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, opt, rec


# --------------------------------------------------------------------------- schedulers
@pytest.mark.parametrize("schedule", ["linear", "cosine", "polynomial"])
def test_hf_schedulers_drive_every_group(tmp_path, schedule):
    trainer, opt, rec = train(tmp_path, lr_scheduler_type=schedule, warmup_steps=3)
    assert trainer.state.global_step == STEPS and opt.num_steps == STEPS
    # The reference: the same HF schedule on a plain optimizer with the same lr (polynomial reads
    # optimizer.defaults["lr"], which GrassAdamW shares with its base AdamW).
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    ref = get_scheduler(schedule, ref_opt, num_warmup_steps=3, num_training_steps=STEPS)
    expected = []
    for _ in range(STEPS):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    for step in range(1, STEPS + 1):
        # every group, blocks frozen by GRASS included, trains at the scheduled lr
        assert rec.lrs[step] == [pytest.approx(expected[step - 1], rel=1e-12)] * len(opt.param_groups), step
    logged = [logs["learning_rate"] for _, logs in rec.logs if "learning_rate" in logs]
    assert logged == pytest.approx(expected, rel=1e-12)
    assert len(opt.param_groups) == LAYERS + 1  # outside + one per block, all driven by the scheduler
    losses = rec.losses()
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # probing (steps 1-2) updated nothing; then exactly 2 blocks train per step
    assert [rec.active[s] for s in (1, 2)] == [(True, (0, 1, 2, 3))] * 2
    assert all(not probing and len(active) == 2 for probing, active in (rec.active[s] for s in range(3, STEPS + 1)))


def test_hf_training_learns(tmp_path):
    _, _, rec = train(tmp_path, steps=40, lr_scheduler_type="constant", warmup_steps=0)
    losses = list(rec.losses().values())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3, losses


# --------------------------------------------------------------------------- checkpoints and resume
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer, opt, rec = train(tmp_path_factory.mktemp("uninterrupted"))
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return rec, opt, params


@pytest.mark.parametrize("k", [1, 7])  # a checkpoint while probing; one mid-window (not a multiple of 4)
def test_hf_resume_continues_exactly(tmp_path, uninterrupted, k):
    ref, ref_opt, ref_params = uninterrupted
    _, _, saved = train(tmp_path / "saved", save_strategy="steps", save_steps=k)
    assert saved.losses() == ref.losses()  # saving checkpoints does not perturb the run
    ckpt = tmp_path / "saved" / f"checkpoint-{k}"
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)  # what the Trainer's resume does
    assert sd["grass"]["step"] == k

    # A fresh process would build a fresh model and optimizer: so does this run (other init seed).
    trainer, opt, resumed = train(tmp_path / "resumed", model=tiny_llama(seed=1), save_strategy="steps",
                                  save_steps=k, resume=str(ckpt))
    assert trainer.state.global_step == STEPS and opt.num_steps == STEPS
    ref_losses, losses = ref.losses(), resumed.losses()
    assert sorted(losses) == list(range(k + 1, STEPS + 1))
    assert losses == {s: ref_losses[s] for s in losses}  # bit-identical, not just close
    assert all(resumed.active[s] == ref.active[s] for s in range(k + 1, STEPS + 1))
    grad_norms = [(s, logs["grad_norm"]) for s, logs in resumed.logs if "grad_norm" in logs]
    assert grad_norms == [(s, logs["grad_norm"]) for s, logs in ref.logs if "grad_norm" in logs and s > k]
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, ref_params[name]), name
    assert torch.equal(opt.importance, ref_opt.importance)
    assert torch.equal(opt.probabilities, ref_opt.probabilities)
    assert opt.active_layer_indices == ref_opt.active_layer_indices


@pytest.mark.parametrize("outside, reentrant", [("train", None), ("freeze", True)])
def test_hf_activation_checkpointing_is_exact(tmp_path, outside, reentrant):
    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    ckpt = {name: True}
    if reentrant is not None:  # with everything before the blocks frozen: the Trainer enables input grads
        ckpt[f"{name}_kwargs"] = {"use_reentrant": reentrant}
    runs = []
    for kwargs in ({}, ckpt):
        model = tiny_llama()
        opt = GrassAdamW(model, lr=LR, outside_blocks=outside, **GRASS)
        trainer, _, rec = train(tmp_path / str(len(runs)), model=model, opt=opt, **kwargs)
        runs.append((rec, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    (ref, ref_params), (rec, params) = runs
    assert rec.losses() == ref.losses() and rec.active == ref.active
    assert all(torch.equal(params[n], ref_params[n]) for n in ref_params)
    trained = [n for n in ref_params if not torch.equal(ref_params[n], tiny_llama().state_dict()[n])]
    assert any(".layers." in n for n in trained)  # the blocks did train
    assert (outside == "train") == any(".layers." not in n for n in trained)


def test_hf_optimizer_set_after_init(tmp_path, uninterrupted):
    """The guide's fp16 recipe: build the Trainer first, then GrassAdamW with the Trainer's GradScaler."""
    ref, _, ref_params = uninterrupted
    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8,
                             logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0, lr_scheduler_type="linear", warmup_steps=3,
                             save_strategy="no")
    rec = Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=Arithmetic(), callbacks=[rec])
    extra = {}
    if "grad_scaler" in inspect.signature(GrassAdamW).parameters:
        extra["grad_scaler"] = trainer.accelerator.scaler  # None here: no fp16 on the CPU
    trainer.optimizer = GrassAdamW(model, lr=LR, **GRASS, **extra)
    trainer.train()
    assert rec.losses() == ref.losses() and rec.active == ref.active
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, ref_params[n]), n


def test_hf_decay_groups_recipe(tmp_path):
    """The guide's recipe for the Trainer's decay / no-decay groups, wrapped by GrassAdamW."""
    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, report_to=[],
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Arithmetic())
    decay = set(trainer.get_decay_parameter_names(model))
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    trainer.optimizer = opt = GrassAdamW(model, base_optimizer=torch.optim.AdamW(groups, lr=LR), **GRASS)
    trainer.train()
    no_decay = {id(p) for n, p in named if "norm" in n}
    assert no_decay and all(g["weight_decay"] == (0.0 if id(g["params"][0]) in no_decay else 0.01)
                            for g in opt.param_groups)
    assert len(opt.param_groups) == 2 * (LAYERS + 1) and opt.num_steps == 6


# --------------------------------------------------------------------------- the callback
def block_keys(prefix):
    return {f"grass/{prefix}/{i}" for i in range(LAYERS)}


SCALAR_KEYS = {"grass/probing", "grass/num_steps", "grass/state_device_bytes", "grass/state_host_bytes"}


def test_grass_callback_logs_documented_metrics(tmp_path):
    eval_set = Arithmetic(16, seed=1)
    model = tiny_llama()
    opt = GrassAdamW(model, lr=LR, **GRASS)
    rec = Recorder()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, logging_steps=1,
                             report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                             save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Arithmetic(), eval_dataset=eval_set,
                      optimizers=(opt, None), callbacks=[rec, GrassCallback()])
    cb = add_grass_callback(trainer)
    # moved first, not duplicated: the recorder (like a reporting integration) now sees the metrics
    assert trainer.callback_handler.callbacks[0] is cb
    assert sum(isinstance(c, GrassCallback) for c in trainer.callback_handler.callbacks) == 1
    trainer.train()

    train_logs = [(s, logs) for s, logs in rec.logs if "loss" in logs]
    assert [s for s, _ in train_logs] == list(range(1, 9))
    # the blocks after each step: those the next step trains
    after = {s: rec.active[s + 1][1] for s in range(1, 8)} | {8: opt.active_layer_indices}
    for step, logs in train_logs:
        probing = step < GRASS["probe_steps"]  # the state after this step's opt.step()
        keys = {k for k in logs if k.startswith("grass/")}
        expected = SCALAR_KEYS | block_keys("active") | block_keys("p")
        assert keys == (expected if probing else expected | block_keys("importance")), step
        assert all(isinstance(logs[k], float) for k in keys)
        assert logs["grass/probing"] == float(probing) and logs["grass/num_steps"] == step
        active = [i for i in range(LAYERS) if logs[f"grass/active/{i}"] == 1.0]
        assert all(logs[f"grass/active/{i}"] in (0.0, 1.0) for i in range(LAYERS))
        assert active == list(after[step])
        assert len(active) == (LAYERS if probing else GRASS["active_layers"])
        assert sum(logs[f"grass/p/{i}"] for i in range(LAYERS)) == pytest.approx(1.0)
        assert logs["grass/state_host_bytes"] == 0.0
        # state appears with the first update (step 3): AdamW's two moments for the active blocks + outside
        assert (logs["grass/state_device_bytes"] > 0) == (step > GRASS["probe_steps"])
    assert train_logs[-1][1]["grass/state_device_bytes"] == opt.memory_report().device_state_bytes
    assert [train_logs[-1][1][f"grass/importance/{i}"] for i in range(LAYERS)] == opt.importance.tolist()

    # The metrics are in log_history (so in trainer_state.json) too; evaluation logs are left alone.
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert all(set(h) >= SCALAR_KEYS for h in history) and len(history) == 8
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and not any(k.startswith("grass/") for k in rec.logs[-1][1])
    json.dumps(trainer.state.log_history)  # plain floats, no NaN


def test_grass_callback_per_block_off_and_wrong_optimizer(tmp_path, caplog):
    _, _, rec = train(tmp_path / "a", steps=3, grass_callback="first", per_block=False)
    assert {k for k in rec.logs[-2][1] if k.startswith("grass/")} == SCALAR_KEYS

    # A Trainer with its own AdamW: the callback warns once and logs nothing.
    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path / "b"), max_steps=3, per_device_train_batch_size=8,
                             logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, save_strategy="no")
    rec = Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=Arithmetic(), callbacks=[rec])
    add_grass_callback(trainer)
    with caplog.at_level(logging.WARNING, logger="grass_optim.integrations.hf"):
        trainer.train()
    warnings = [r for r in caplog.records if "not a GrassAdamW" in r.getMessage()]
    assert len(warnings) == 1
    assert not any(k.startswith("grass/") for _, logs in rec.logs for k in logs)


def test_grass_callback_warns_when_behind_reporters(caplog):
    args = SimpleNamespace(report_to=["tensorboard"])
    with caplog.at_level(logging.WARNING, logger="grass_optim.integrations.hf"):
        GrassCallback().on_train_begin(args, None, None)
    assert any("add_grass_callback" in r.getMessage() for r in caplog.records)
    caplog.clear()
    cb = add_grass_callback(SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[object()])))
    with caplog.at_level(logging.WARNING, logger="grass_optim.integrations.hf"):
        cb.on_train_begin(args, None, None)
        GrassCallback().on_train_begin(SimpleNamespace(report_to=[]), None, None)
    assert not caplog.records
    ddp = SimpleNamespace(report_to=[], world_size=2, activation_checkpointing=True, ddp_find_unused_parameters=None)
    with caplog.at_level(logging.WARNING, logger="grass_optim.integrations.hf"):
        cb.on_train_begin(ddp, None, None)
        ddp.ddp_find_unused_parameters = True
        cb.on_train_begin(ddp, None, None)
    assert len([r for r in caplog.records if "ddp_find_unused_parameters=True" in r.getMessage()]) == 1


def test_find_grass_optimizer_unwraps():
    opt = GrassAdamW(tiny_llama(), **GRASS)
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt))
    assert find_grass_optimizer(wrapped) is opt and find_grass_optimizer(opt) is opt
    assert find_grass_optimizer(None) is None
    assert find_grass_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) is None
    loop = SimpleNamespace()
    loop.optimizer = loop
    assert find_grass_optimizer(loop) is None


# --------------------------------------------------------------------------- imports
def test_transformers_imported_only_by_the_integration():
    code = (
        "import sys\n"
        "import grass_optim, grass_optim.integrations\n"
        "assert 'transformers' not in sys.modules and 'accelerate' not in sys.modules, 'eager import'\n"
        "assert 'GrassCallback' in dir(grass_optim.integrations)\n"
        "from grass_optim.integrations import grass_settings\n"
        "assert grass_settings({'lisa_n_layers': 1}) == {'active_layers': 1}\n"
        "assert 'transformers' not in sys.modules and 'yaml' not in sys.modules, 'eager import by grass_settings'\n"
        "from grass_optim.integrations import GrassCallback\n"
        "assert 'transformers' in sys.modules\n"
        "import transformers\n"
        "assert issubclass(GrassCallback, transformers.TrainerCallback)\n"
        "try:\n"
        "    grass_optim.integrations.nothing\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------- the example
def test_example_hf_trainer_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "examples/hf_trainer.py", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert "test accuracy" in proc.stdout and "active sets in order:" in proc.stdout
    assert "step   40 | loss" in proc.stdout, proc.stdout
    state = json.loads((out / "checkpoint-40" / "trainer_state.json").read_text())
    assert any("grass/p/0" in h for h in state["log_history"])
    # --resume continues from the last checkpoint
    proc = subprocess.run(cmd + ["--resume", "--steps", "44"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert "trained 44 steps" in proc.stdout and (out / "checkpoint-44").is_dir()
