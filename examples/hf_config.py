"""GRASS turned on from a config file, in the Hugging Face Trainer and in TRL's SFTTrainer with LoRA.

    python examples/hf_config.py --quick            # Trainer, settings from examples/grass.yaml (~10 s)
    python examples/hf_config.py --quick --sft      # also TRL SFTTrainer(peft_config=LoraConfig(...))
    python examples/hf_config.py --config my.yaml   # your settings (GrassAdamW's names or LISA's)

The settings file holds GRASS's settings only (``examples/grass.yaml``); the optimizer's learning rate,
betas, eps, weight decay and ``optim`` stay in the ``TrainingArguments``. ``GrassTrainer`` builds the
Trainer's own optimizer in ``create_optimizer`` (after TRL/PEFT have wrapped the model) and wraps it
with GrassAdamW. For another Trainer subclass, put the mixin first:
``class GrassSFTTrainer(GrassTrainerMixin, SFTTrainer): pass``.

A tiny ``LlamaForCausalLM`` built from a config with random weights learns arithmetic sequences
(``a, a+d, a+2d, ...`` mod 64) on the CPU; nothing is downloaded (the SFT run builds a word-level
tokenizer locally and passes pre-tokenized ``input_ids``).
"""

import argparse
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainingArguments  # noqa: E402

try:
    from grass_optim.integrations import GrassTrainer, GrassTrainerMixin, find_grass_optimizer, grass_settings
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grass_optim.integrations import GrassTrainer, GrassTrainerMixin, find_grass_optimizer, grass_settings

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB, SEQ, LAYERS = 64, 16, 4


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=SEQ))


def sequences(n: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    start, step = torch.randint(2, VOCAB, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    return 2 + (start - 2 + step * torch.arange(SEQ)) % (VOCAB - 2)  # ids 0, 1: pad, eos


class Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def common_args(out: str, steps: int) -> dict:
    return {"output_dir": out, "max_steps": steps, "per_device_train_batch_size": 16, "learning_rate": 5e-3,
            "weight_decay": 0.01, "lr_scheduler_type": "cosine", "warmup_steps": 10,  # past probe_steps
            "logging_steps": 10, "report_to": "none", "use_cpu": True, "disable_tqdm": True,
            "save_strategy": "no", "seed": 0}


def report(name: str, trainer) -> None:
    opt = find_grass_optimizer(trainer.optimizer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{name}: {opt.num_steps} steps | loss {losses[0]:.3f} -> {losses[-1]:.3f} | "
          f"base {type(opt.base_optimizer).__name__} | {len(opt.param_groups)} groups | "
          f"blocks {list(opt.layer_names)} | active now {opt.active_layer_indices}")


def train_with_trainer(settings: dict, out: str, steps: int) -> None:
    trainer = GrassTrainer(model=tiny_llama(), args=TrainingArguments(**common_args(out, steps)),
                           train_dataset=Rows(sequences()), grass=settings)
    trainer.remove_callback(PrinterCallback)  # report() prints a summary instead
    trainer.train()
    report("Trainer", trainer)


def train_with_sft_lora(settings: dict, out: str, steps: int) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    class GrassSFTTrainer(GrassTrainerMixin, SFTTrainer):  # the mixin first
        pass

    words = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = GrassSFTTrainer(
        model=model, args=SFTConfig(**common_args(out, steps), max_length=None),
        train_dataset=Dataset.from_dict({"input_ids": sequences().tolist()}), processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        grass=settings)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    report("SFTTrainer + LoRA", trainer)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in trainer.model.named_parameters() if "lora_" not in n}
    print(f"SFTTrainer + LoRA: base weights unchanged: {all(torch.equal(p, before[n]) for n, p in base.items())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(HERE, "grass.yaml"), help="GRASS settings (YAML or JSON)")
    p.add_argument("--quick", action="store_true", help="30 steps instead of 200")
    p.add_argument("--sft", action="store_true", help="also train with TRL's SFTTrainer and a LoRA adapter")
    args = p.parse_args()
    settings = grass_settings(args.config)  # checked now: an unknown or conflicting key fails here
    print(f"GRASS settings from {os.path.basename(args.config)}: {settings}")
    steps = 30 if args.quick else 200
    with tempfile.TemporaryDirectory() as out:
        train_with_trainer(settings, out, steps)
        if args.sft:
            train_with_sft_lora(settings, out, steps)


if __name__ == "__main__":
    main()
