"""Layer discovery on Hugging Face architectures and plain user models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grass_optim import GrassAdamW, find_layers, unwrap_model
from tests.helpers import TinyNet, make_net, round_trip


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


# ----------------------------------------------------------------------------- several stacks (issue 14)
def _tiny(arch):
    """Tiny configurations of common Hugging Face architectures: (model, stacks, inputs builder)."""
    T = pytest.importorskip("transformers")
    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    if arch == "t5":
        model = T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=3,
                                                        num_decoder_layers=3, num_heads=2, decoder_start_token_id=0,
                                                        dropout_rate=0.0,
                                                        pad_token_id=0))
        return model, ["encoder.block", "decoder.block"]
    if arch == "bart":
        model = T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64))
        return model, ["model.encoder.layers", "model.decoder.layers"]
    if arch == "whisper":
        model = T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=100, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
            max_source_positions=32, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1))
        return model, ["model.encoder.layers", "model.decoder.layers"]
    model = T.LlavaForConditionalGeneration(T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=8, patch_size=4, projection_dim=16),
        text_config=T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1),
        image_token_index=63, vision_feature_layer=-1))
    return model, ["model.vision_tower.encoder.layers", "model.language_model.layers"]


# What may stay outside the blocks: embeddings, norms, heads (and stems and projectors).
OUTSIDE_OK = ("shared", "embed", "norm", "layernorm", "layer_norm", "lm_head", "conv1", "conv2",
              "multi_modal_projector", "pre_layrnorm", "post_layernorm")


@pytest.mark.parametrize("arch", ["t5", "bart", "whisper", "llava"])
def test_every_stack_of_an_encoder_decoder_or_vision_language_model_is_sampled(arch):
    model, stacks = _tiny(arch)
    part = find_layers(model)
    assert sorted({n.rsplit(".", 1)[0] for n in part.names}) == sorted(stacks)
    expected = [f"{s}.{i}" for s in stacks for i in range(len(model.get_submodule(s)))]
    assert sorted(part.names) == sorted(expected)
    names = {id(p): n for n, p in model.named_parameters()}
    outside = [names[id(p)] for p in part.outside_params]
    assert outside and all(any(k in n for k in OUTSIDE_OK) for n in outside), outside
    assert find_layers(model, stacks).names == tuple(n for s in stacks for n in expected if n.startswith(s + "."))


@pytest.mark.parametrize(("arch", "path"), [("llama", "model.layers"), ("mistral", "model.layers"),
                                            ("qwen2", "model.layers"), ("gemma2", "model.layers"),
                                            ("mixtral", "model.layers"), ("gptneox", "gpt_neox.layers"),
                                            ("gpt2", "transformer.h")])
def test_decoder_only_models_have_one_stack(arch, path):
    T = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
    configs = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=1, **common)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=1, **common)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=1, **common)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(num_key_value_heads=1, head_dim=8, **common)),
        "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(num_key_value_heads=1, num_local_experts=4,
                                                                num_experts_per_tok=2, **common)),
        "gptneox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**common)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=32)),
    }
    part = find_layers(configs[arch]())
    assert part.names == tuple(f"{path}.{i}" for i in range(3))


def _t5_batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 64, (4, 6), generator=g), torch.randint(0, 64, (4, 5), generator=g)) for _ in range(n)]


def _t5_train(model, opt, data):
    for ids, labels in data:
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()


def test_t5_every_block_active_equals_adamw():
    ref, _ = _tiny("t5")
    model, _ = _tiny("t5")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = GrassAdamW(model, lr=1e-2, active_layers=6, probe_steps=0)
    data = _t5_batches(4)
    _t5_train(ref, ref_opt, data)
    _t5_train(model, opt, data)
    for p, q in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("offload", ["inactive", "stream"])
def test_t5_samples_both_stacks_offloads_and_resumes_identically(offload):
    data = _t5_batches(16)
    ref, _ = _tiny("t5")
    ref_opt = GrassAdamW(ref, lr=1e-2, active_layers=2, switch_every=1, probe_steps=2, seed=0)
    drawn = []
    for ids, labels in data:
        ref_opt.zero_grad()
        ref(input_ids=ids, labels=labels).loss.backward()
        ref_opt.step()
        drawn += [ref_opt.layer_names[i] for i in ref_opt.active_layer_indices]
    assert any(n.startswith("encoder.") for n in drawn) and any(n.startswith("decoder.") for n in drawn)
    model, _ = _tiny("t5")
    opt = GrassAdamW(model, lr=1e-2, active_layers=2, switch_every=1, probe_steps=2, seed=0, offload=offload)
    _t5_train(model, opt, data[:7])
    saved = round_trip({"model": model.state_dict(), "opt": opt.state_dict()})
    model, _ = _tiny("t5")
    model.load_state_dict(saved["model"])
    opt = GrassAdamW(model, lr=1e-2, active_layers=2, switch_every=1, probe_steps=2, seed=9, offload=offload)
    opt.load_state_dict(saved["opt"])
    _t5_train(model, opt, data[7:])
    for p, q in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_model_mostly_outside_its_blocks_is_warned_about(caplog):
    model = make_net(d=8, num_layers=2, d_out=2048)  # a head of 18 k parameters, blocks of 176
    with caplog.at_level("WARNING", logger="grass_optim"):
        GrassAdamW(model, active_layers=1)
    assert "of the trainable parameters are outside the blocks (largest: head (0.02 M)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="grass_optim"):
        GrassAdamW(make_net(), active_layers=1)
    assert "outside the blocks" not in caplog.text


def test_overlapping_layer_paths_are_refused():
    model, _ = _tiny("t5")
    with pytest.raises(ValueError, match="name a block twice"):
        find_layers(model, ["encoder.block", "encoder.block"])


def test_estimate_memory_bounds_a_t5_run_by_its_two_largest_blocks_of_either_stack():
    from grass_optim import estimate_memory
    model, _ = _tiny("t5")
    est = estimate_memory(model, active_layers=2).rows["grass-inactive"]["optimizer_state"]
    opt = GrassAdamW(model, lr=1e-2, active_layers=2, switch_every=1, probe_steps=0, seed=0, offload="inactive")
    seen = {}
    for ids, labels in _t5_batches(24):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        seen[tuple(opt.layer_names[i] for i in opt.active_layer_indices)] = opt.memory_report().device_state_bytes
    # The two largest blocks are decoder blocks (cross-attention); seed 0 draws them together.
    assert max(seen.values()) == est == seen[("decoder.block.0", "decoder.block.1")]
    assert any(k[0].split(".")[0] != k[1].split(".")[0] for k in seen)  # pairs across the two stacks
