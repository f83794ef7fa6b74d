"""Layer discovery on Hugging Face architectures and plain user models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grass_optim import GrassAdamW, find_layers, unwrap_model
from tests.helpers import TinyNet, make_net


def _hf_models():
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=5, n_head=2, n_positions=32))
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=6, num_attention_heads=2, intermediate_size=32))
    return {"llama": (llama, "model.layers", 3), "gpt2": (gpt2, "transformer.h", 5),
            "bert": (bert, "encoder.layer", 6)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_hugging_face_blocks_are_found(arch):
    model, path, n = _hf_models()[arch]
    part = find_layers(model)
    assert part.names == tuple(f"{path}.{i}" for i in range(n))
    in_blocks = {id(p) for ps in part.block_params for p in ps}
    outside = {id(p) for p in part.outside_params}
    assert not in_blocks & outside
    assert in_blocks | outside == {id(p) for p in model.parameters()}
    assert [sum(p.numel() for p in ps) for ps in part.block_params] == \
        [sum(p.numel() for p in model.get_submodule(f"{path}.{i}").parameters()) for i in range(n)]


def test_tied_embedding_and_head_are_one_outside_parameter():
    model, _, _ = _hf_models()["gpt2"]
    assert model.lm_head.weight is model.transformer.wte.weight
    part = find_layers(model)
    assert sum(p is model.lm_head.weight for p in part.outside_params) == 1
    opt = GrassAdamW(model, probe_steps=0)
    assert sum(p is model.lm_head.weight for g in opt.param_groups for p in g["params"]) == 1


def test_gpt2_trains_only_the_active_blocks():
    model, _, _ = _hf_models()["gpt2"]
    opt = GrassAdamW(model, active_layers=2, probe_steps=0, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        block = int(n.split(".")[2]) if n.startswith("transformer.h.") else None
        changed = not torch.equal(p, before[n])
        if block is not None:
            assert changed == (block in opt.active_layer_indices), n


def test_plain_sequential_mlp():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    part = find_layers(model)
    assert part.names == ("0", "2", "4")
    assert part.outside_params == ()


def test_nested_lists_inside_blocks_are_not_candidates():
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class MoELayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(Expert() for _ in range(8))

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(MoELayer() for _ in range(3))

    assert find_layers(MoE()).names == ("layers.0", "layers.1", "layers.2")


def test_parameter_shared_between_block_and_outside_is_outside():
    model = make_net()
    model.head.weight = model.layers[2].fc.weight  # shape (8, 8): a tied weight
    model.head.bias = nn.Parameter(torch.zeros(8))
    part = find_layers(model)
    shared = model.layers[2].fc.weight
    assert part.owner(shared) is None
    assert all(p is not shared for p in part.block_params[2])


def test_layers_argument_path_and_list():
    model = make_net()
    assert find_layers(model, "layers").names == tuple(f"layers.{i}" for i in range(4))
    part = find_layers(model, [model.layers[3], model.layers[1]])
    assert part.names == ("layers.3", "layers.1")
    # Include the head in sampling: it becomes one more block.
    part = find_layers(model, [*model.layers, model.head])
    assert part.num_layers == 5 and part.owner(model.head.weight) == 4


def test_lists_nested_in_a_sequential_root_are_ignored():
    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    assert find_layers(nn.Sequential(B(), B())).names == ("0", "1")


def test_empty_layers_path_is_refused():
    with pytest.raises(ValueError, match="Invalid layers: '' \\(expected a dotted path"):
        find_layers(make_net(), "")


def test_no_blocks_found_tells_how_to_pass_layers():
    with pytest.raises(ValueError, match=r"Could not find the repeated blocks of Linear.*layers='model.layers'"):
        find_layers(nn.Linear(2, 2))


def test_wrappers_are_unwrapped():
    model = make_net()
    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model
    assert find_layers(compiled).names == find_layers(model).names
    dp = nn.DataParallel(model)
    assert unwrap_model(dp) is model


def test_longest_list_wins():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.short = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
            self.long = TinyNet(num_layers=5)

    assert find_layers(Two()).names == tuple(f"long.layers.{i}" for i in range(5))
