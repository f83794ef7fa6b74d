"""GRASS under the Hugging Face Trainer: a tiny Llama learns to reverse words, on CPU, in about a minute.

    python examples/hf_trainer.py                      # ~1 min on 2 CPU cores
    python examples/hf_trainer.py --quick              # ~15 s smoke run (used by tests/test_hf_trainer.py)
    python examples/hf_trainer.py --resume --steps 800 # continue from the last checkpoint in --out
    python examples/hf_trainer.py --report-to tensorboard   # then: tensorboard --logdir runs/hf_trainer/runs

What it does, top to bottom:
  1. builds a 6-block ``LlamaForCausalLM`` from a config, with random weights (nothing is
     downloaded, no tokenizer is needed: the task is character-level);
  2. makes a task offline and deterministically: ``<s>qwhxkpadfo|ofdapkxhwq``, a random 10-letter
     word, "|", then the word reversed. The loss is on the reversed half only. Reversing needs
     the blocks: training only the embeddings and the head (the blocks frozen at their random
     init) gets ~16 % of the letters and no word right;
  3. trains it with ``Trainer(..., optimizers=(GrassAdamW(model, ...), None))`` under the Trainer's
     own warm-up + cosine schedule, with a checkpoint every ``SAVE_STEPS`` steps;
     ``add_grass_callback`` puts GRASS's metrics (``grass/active/<i>``, ``grass/p/<i>``,
     ``grass/importance/<i>``, ``grass/state_device_bytes``, ...) into every training log, where
     ``--report-to`` integrations record them like the loss;
  4. prints accuracy before/after (exact match: greedy decoding writes the whole reversal right),
     the active sets in order, and each block's final score, probability and optimizer state.
"""

import argparse
import os
import random
import string
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never touch the network

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

try:
    from grass_optim import GrassAdamW
    from grass_optim.integrations import add_grass_callback
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grass_optim import GrassAdamW
    from grass_optim.integrations import add_grass_callback

# ----------------------------------------------------------------------------- settings
STEPS = 600  # ~50 s on 2 CPU cores; exact match goes from 0 to ~100 % in ~400 steps
QUICK_STEPS = 40  # --quick: a smoke run that still probes, draws, redraws and saves a checkpoint
WORD_LEN = 10  # letters to reverse: 22 tokens a sequence with <s> and "|"
N_TRAIN, N_TEST = 20_000, 500  # distinct words; the test words are not in the training set
BATCH_SIZE = 32  # ~0.05 s a step on one CPU core; 600 steps see each training word about once
HIDDEN, LAYERS, HEADS = 64, 6, 4  # a 0.25M-parameter Llama: fast on CPU, 6 blocks to choose from
LR = 3e-3  # small models trained from scratch want a large rate; stable here with the warm-up
WEIGHT_DECAY = 0.01  # AdamW's default decoupled weight decay
ACTIVE_LAYERS = 2  # gamma: blocks trained at a time, out of 6
SWITCH_EVERY = 25  # T_s: ~24 draws in 600 steps, so every block gets several turns
PROBE_STEPS = 10  # T_p: steps that only measure every block before the first draw
WARMUP_STEPS = PROBE_STEPS + 20  # probing steps are scheduler steps too: warm up past them
MAX_GRAD_NORM = 1.0  # the Trainer's default clipping (of the active blocks + outside only)
LOGGING_STEPS = 5  # each log carries GRASS's metrics; 5 divides every redraw step (10 + 25 k)
PRINT_EVERY = 50  # steps between the progress lines printed below
SAVE_STEPS = 200  # checkpoints (model, GrassAdamW state, scheduler, RNG): --resume continues from the last
THREADS = 1  # the matrices are tiny: one thread is as fast as two, and unaffected by a busy machine
SEED = 0  # seeds the data, the model's init, the Trainer's shuffling and GrassAdamW's own generator
OUT_DIR = "runs/hf_trainer"  # checkpoints and logs (runs/ is git-ignored)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=None,
                    help=f"optimizer steps (default {STEPS}, {QUICK_STEPS} with --quick)")
parser.add_argument("--seed", type=int, default=SEED)
parser.add_argument("--out", default=OUT_DIR, help=f"output directory (default {OUT_DIR})")
parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
parser.add_argument("--report-to", default="none",
                    help="Trainer integrations that record the logs, e.g. tensorboard or wandb (default none)")
parser.add_argument("--quick", action="store_true", help="~15 s smoke run: fewer steps, less data, faster schedule")
args = parser.parse_args()
if args.steps is not None and args.steps < 1:
    parser.error("--steps must be at least 1")
if args.quick:
    N_TRAIN, N_TEST, PROBE_STEPS, SWITCH_EVERY, SAVE_STEPS, PRINT_EVERY = 2000, 200, 4, 8, 20, 8
    WARMUP_STEPS, LOGGING_STEPS = PROBE_STEPS + 4, 4
steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else STEPS)
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar at each checkpoint
torch.set_num_threads(THREADS)
torch.manual_seed(args.seed)

# ----------------------------------------------------------------------------- data
VOCAB = ["<s>", "|", *string.ascii_lowercase]
STOI = {c: i for i, c in enumerate(VOCAB)}
PROMPT = WORD_LEN + 2  # "<s>" + word + "|": no loss on these


def words(n, rng, exclude=frozenset()):
    out, seen = [], set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(WORD_LEN))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def encode(ws):
    ids = torch.tensor([[STOI["<s>"], *(STOI[c] for c in w), STOI["|"], *(STOI[c] for c in reversed(w))]
                        for w in ws])
    labels = ids.clone()
    labels[:, :PROMPT] = -100  # the model shifts labels itself: position t predicts token t + 1
    return ids, labels


class Reversal(torch.utils.data.Dataset):
    def __init__(self, ws):
        self.ids, self.labels = encode(ws)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


rng = random.Random(args.seed)
train_words = words(N_TRAIN, rng)
train_set, test_set = Reversal(train_words), Reversal(words(N_TEST, rng, exclude=train_words))

# ----------------------------------------------------------------------------- model
config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                     max_position_embeddings=2 * PROMPT, tie_word_embeddings=False)
model = LlamaForCausalLM(config)
n_params = sum(p.numel() for p in model.parameters())


@torch.no_grad()
def accuracy():
    """Token accuracy and exact match of the reversal, teacher-forced (= greedy decoding when all right)."""
    model.eval()
    pred = model(input_ids=test_set.ids).logits[:, PROMPT - 1:-1].argmax(-1)
    model.train()
    right = pred == test_set.ids[:, PROMPT:]
    return right.float().mean().item(), right.all(-1).float().mean().item()


# ----------------------------------------------------------------------------- optimizer and Trainer
opt = GrassAdamW(model, lr=LR, weight_decay=WEIGHT_DECAY, active_layers=ACTIVE_LAYERS,
                 switch_every=SWITCH_EVERY, probe_steps=PROBE_STEPS, seed=args.seed)
training_args = TrainingArguments(
    output_dir=args.out, max_steps=steps, per_device_train_batch_size=BATCH_SIZE,
    lr_scheduler_type="cosine", warmup_steps=WARMUP_STEPS, max_grad_norm=MAX_GRAD_NORM,
    logging_steps=LOGGING_STEPS, save_strategy="steps", save_steps=SAVE_STEPS, save_total_limit=2,
    report_to=args.report_to, seed=args.seed, use_cpu=True, disable_tqdm=True,
    dataloader_num_workers=0)


class Progress(TrainerCallback):
    """One line every PRINT_EVERY steps, read from the log dict (where GrassCallback put its metrics)."""

    def __init__(self):
        self.sets = []  # (step, active set) each time the logged set changes: drawn after that step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in logs:
            return  # the end-of-training summary
        active = tuple(i for i in range(LAYERS) if logs.get(f"grass/active/{i}"))
        phase = "probing" if logs["grass/probing"] else f"active {list(active)}"
        if not logs["grass/probing"] and (not self.sets or self.sets[-1][1] != active):
            self.sets.append((state.global_step, active))
        if state.global_step % PRINT_EVERY == 0:
            p = " ".join(f"{logs[f'grass/p/{i}']:.2f}" for i in range(LAYERS))
            print(f"step {state.global_step:4d} | loss {logs['loss']:.3f} | lr {logs['learning_rate']:.2e} | "
                  f"{phase:<16} | p {p} | {time.perf_counter() - t0:5.1f} s", flush=True)


progress = Progress()
trainer = Trainer(model=model, args=training_args, train_dataset=train_set, optimizers=(opt, None),
                  callbacks=[progress])
trainer.remove_callback(PrinterCallback)  # it would print every log dict, GRASS's metrics and all
add_grass_callback(trainer)  # first among the callbacks, so the --report-to integrations see its metrics

print(f"model : LlamaForCausalLM from config, {n_params / 1e6:.2f}M params, {opt.num_layers} blocks "
      f"{opt.layer_names[0]}..{opt.layer_names[-1].rsplit('.', 1)[-1]}, random init")
print(f"task  : reverse a {WORD_LEN}-letter word, {len(train_set)} train / {len(test_set)} test, "
      f"e.g. {''.join(VOCAB[i] for i in train_set.ids[0].tolist())}")
print(f"optim : GrassAdamW(lr={LR}, active_layers={ACTIVE_LAYERS}, switch_every={SWITCH_EVERY}, "
      f"probe_steps={PROBE_STEPS}) under the Trainer's cosine schedule (warm-up {WARMUP_STEPS}), "
      f"{steps} steps of batch {BATCH_SIZE}")
tok_before, exact_before = accuracy()
t0 = time.perf_counter()
trainer.train(resume_from_checkpoint=True if args.resume else None)
elapsed = time.perf_counter() - t0
tok_after, exact_after = accuracy()

# ----------------------------------------------------------------------------- report
print(f"\ntrained {trainer.state.global_step} steps in {elapsed:.0f} s "
      f"({opt.config.probe_steps} probing, then {opt.num_steps - opt.config.probe_steps} steps on "
      f"{ACTIVE_LAYERS} blocks each)")
print(f"test accuracy (random init -> trained): tokens {tok_before:.1%} -> {tok_after:.1%}, "
      f"exact match {exact_before:.1%} -> {exact_after:.1%}")
print("active sets in order: " + " ".join(f"{list(s)}@{step}" for step, s in progress.sets))
report = opt.memory_report()
print(f"\n{'block':>5} {'name':<16} {'importance':>10} {'p':>6} {'state':>9}")
importance, probabilities = opt.importance.tolist(), opt.probabilities.tolist()
for i, name in enumerate(opt.layer_names):
    print(f"{i:5d} {name:<16} {importance[i]:10.2e} {probabilities[i]:6.3f} "
          f"{report.device_state_bytes_per_block[i] / 1e3:6.1f} kB")
adamw_bytes = 2 * 4 * n_params  # exp_avg + exp_avg_sq in float32 for every parameter
print(f"optimizer state: {report.device_state_bytes / 1e3:.1f} kB held by GrassAdamW "
      f"(every block visited keeps its state) vs {adamw_bytes / 1e3:.1f} kB for AdamW")
checkpoints = sorted((d for d in os.listdir(args.out) if d.startswith("checkpoint-")),
                     key=lambda d: int(d.split("-")[1]))
print(f"checkpoints in {args.out}: {', '.join(checkpoints)} (run again with --resume to continue)")
