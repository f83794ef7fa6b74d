"""GrassAdamW in multi-process training: DDP and FSDP2, 2 ranks, gloo on CPU.

All tasks run on one pool of 2 ranks started once for this module (``tests/dist_helpers.py``:
starting a rank costs ~15 s here). Each rank trains on its half of every global batch; the
1-process references run in the pytest process on the whole global batches. The examples are run
with torchrun in subprocesses. ~1 min on 2 CPU cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with the gloo backend", allow_module_level=True)

from tests import dist_helpers as H  # noqa: E402

NORMS_DISAGREE = "ranks disagree on the gradient norms"


@pytest.fixture(scope="module")
def pool():
    p = H.WorkerPool()
    yield p
    p.close()


def _actives(history):
    return [h["active"] for h in history]


def _importances(history):
    return torch.stack([h["importance"] for h in history])


def _assert_matches_reference(outcomes, ref, *, atol):
    """Every rank: the same draws as the 1-process run on the global batches, the same scores and
    parameters within float tolerance (averaging half-batch gradients is not bitwise the
    whole-batch gradient)."""
    for o in outcomes:
        got = o.unwrap()
        assert _actives(got["history"]) == _actives(ref["history"]), f"rank {o.rank}"
        torch.testing.assert_close(_importances(got["history"]), _importances(ref["history"]),
                                   rtol=1e-5, atol=1e-7, equal_nan=True)
        torch.testing.assert_close(got["params"], ref["params"], rtol=0, atol=atol)


# ----------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("probe_steps", [0, 2])
@pytest.mark.parametrize("order", ["after", "before"])
def test_ddp_ranks_agree_and_match_one_process(pool, order, probe_steps):
    """GrassAdamW(ddp) or GrassAdamW(model) then DDP: 30 steps, a redraw every 3, no explicit seed
    and a different torch seed per rank."""
    steps = 30
    outcomes = pool.run("ddp_train", order=order, steps=steps, probe_steps=probe_steps)
    values = [o.unwrap() for o in outcomes]
    assert all(v["seed"] == H.TORCH_SEED for v in values)  # rank 0's seed, on every rank
    assert all(v["params_equal_across_ranks"] for v in values)
    assert _actives(values[0]["history"]) == _actives(values[1]["history"])
    assert torch.equal(_importances(values[0]["history"]).nan_to_num(-1),
                       _importances(values[1]["history"]).nan_to_num(-1))
    drawn = {b for a in _actives(values[0]["history"])[probe_steps:] for b in a}
    assert len(drawn) >= 3  # the comparison is meaningful: the active set changed several times
    ref = H.train_reference(steps, probe_steps=probe_steps)
    _assert_matches_reference(outcomes, ref, atol=1e-6)


VARIANTS = [{"refresh_all": True}, {"sampler": "l1", "refresh_all": True}, {"sampler": "gain"}]


@pytest.mark.parametrize("variant", VARIANTS, ids=["refresh_all", "l1+refresh_all", "gain"])
@pytest.mark.parametrize("task", ["ddp_train", "fsdp_train"])
def test_refresh_all_and_other_signals_match_one_process(pool, task, variant):
    """The measure-every-block step and the l1/gain signals under DDP (gradients averaged, every
    block measured in step()) and FSDP2 (sums of shards added across ranks)."""
    steps = 18
    kwargs = {"probe_steps": 0, "switch_every": 3, "active_layers": 1, "seed": 5, **variant}
    extra = {"order": "after"} if task == "ddp_train" else {}
    outcomes = pool.run(task, steps=steps, **extra, **kwargs)
    values = [o.unwrap() for o in outcomes]
    assert _actives(values[0]["history"]) == _actives(values[1]["history"])
    d = H.FSDP_D if task == "fsdp_train" else 8
    ref = H.train_reference(steps, d=d, **kwargs)
    _assert_matches_reference(outcomes, ref, atol=1e-6)
    final = _importances(values[0]["history"])[-1]
    if variant.get("refresh_all"):
        assert torch.isfinite(final).all(), "every block is scored at the first refresh"


def test_ddp_resume_from_rank0_checkpoint(pool, tmp_path):
    """opt.state_dict() is the same on every rank: rank 0 saves it, every rank loads it into a fresh
    model, DDP and GrassAdamW; the continued run is bit-identical to an uninterrupted one."""
    for out in pool.values("ddp_resume", tmpdir=str(tmp_path), steps=14, stop=6):
        assert out["optimizer_state_same_on_ranks"]
        assert out["equal"], out["max_diff"]


def test_ddp_without_find_unused_parameters_is_refused(pool):
    for out in pool.values("ddp_invalid_wrappers"):
        for config in ("find_unused_parameters=False", "static_graph=True"):
            assert out[config].startswith("ValueError: Invalid model: DistributedDataParallel with "
                                          "find_unused_parameters=False (or static_graph=True)"), out[config]
            assert "find_unused_parameters=True" in out[config]


def test_ddp_built_after_optimizer_without_unused_is_refused_at_first_step(pool):
    """DDP(model) with find_unused_parameters=False built after GrassAdamW(model): construction cannot
    see it, so the first step finds it and refuses it before anything is updated (before: DDP's
    "Expected to have finished reduction" at step 3, after step 2 applied un-averaged gradients)."""
    for out in pool.values("ddp_after_optimizer_without_unused"):
        assert out["error_step"] == 1 and out["params_unchanged"], out
        assert out["error"].startswith("ValueError: Invalid model: DistributedDataParallel with "
                                       "find_unused_parameters=False"), out
        assert "DistributedDataParallel(model, find_unused_parameters=True)" in out["error"]
        assert "Accelerate" not in out["error"]  # Accelerate is not in use here


def test_ddp_built_while_blocks_frozen_is_refused_at_construction(pool):
    for out in pool.values("ddp_built_while_frozen"):
        assert out["registered_tensors"] < out["model_tensors"]  # DDP really left blocks 1..3 out
        assert out["construct_error"] is not None and out["construct_error"].startswith("ValueError"), out


def test_ddp_built_while_blocks_frozen_never_diverges_silently(pool):
    """Whichever check fires (construction, or the first refresh after an unregistered block trained),
    the run stops instead of training un-averaged blocks."""
    for out in pool.values("ddp_built_while_frozen"):
        assert out["registered_tensors"] == 8 and out["model_tensors"] == 20
        if out["construct_error"] is None:
            assert out["train_error"] is not None and NORMS_DISAGREE in out["train_error"], out


def test_ddp_built_after_the_first_step_raises_at_a_refresh(pool):
    """DDP built after GrassAdamW froze blocks registers only the active one: the first refresh after
    another block trained sees different norms on the two ranks."""
    values = pool.values("ddp_wrapped_after_first_step")
    for out in values:
        assert out["registered_tensors"] == 8  # the active block (4 tensors) + embed and head (2 each)
        assert out["train_error"] is not None and NORMS_DISAGREE in out["train_error"], out
        assert "DistributedDataParallel" in out["train_error"] and "distributed_checks=False" in out["train_error"]
    assert values[0]["error_step"] == values[1]["error_step"]
    # Without the checks the same mistake trains on, and the ranks' parameters drift apart.
    for out in pool.values("ddp_wrapped_after_first_step", checks=False):
        assert out["train_error"] is None and out["params_equal_across_ranks"] is False


def test_different_explicit_seeds_are_refused(pool):
    for out in pool.values("seeds", checks=True):
        assert out["error"] is not None and "ranks disagree on seed" in out["error"]
        assert "same seed on every rank" in out["error"]
    assert [out["seed"] for out in pool.values("seeds", checks=False)] == [0, 1]


def test_ddp_communication_of_frozen_blocks(pool):
    """benchmarks/ddp_comm.py, 6 steps: frozen buckets are all-reduced; skipping them (DDP's
    skip_all_reduce_unused_params, or a comm hook) halves the bytes and changes nothing else."""
    result = pool.values("ddp_comm", steps=6)[0]
    rows = {r["method"]: r for r in result["rows"]}
    model = result["model_bytes"]
    for r in rows.values():
        assert r["same_on_ranks"], r["method"]
        assert r["bucket_bytes"] == model  # buckets for every parameter, frozen or not
        assert r["step1_reduced_bytes"] == model  # nothing is frozen before the end of step 1
    assert rows["adamw"]["reduced_bytes_per_step"] == model
    assert rows["grass"]["reduced_bytes_per_step"] == model  # 3 of 4 blocks frozen, all still all-reduced
    for name in ("grass+skip_unused", "grass+skip_hook"):
        r = rows[name]
        assert r["same_params_as_grass"] and r["same_draws_as_grass"], name
        frozen = 3 * result["block_bytes"]
        assert model - frozen <= r["reduced_bytes_per_step"] < 0.6 * model, name
    hook = rows["grass+skip_hook"]
    assert hook["skipped_bytes_per_step"] + hook["reduced_bytes_per_step"] == model
    assert rows["grass+skip_hook@25MB"]["buckets"] == 1  # one bucket holds everything: nothing to skip
    assert rows["grass+skip_hook@25MB"]["reduced_bytes_per_step"] == model
    # Gradient memory: GRASS frees frozen .grad tensors, but DDP's buckets stay full size; with
    # gradient_as_bucket_view the .grad tensors are the buckets, so freezing saves nothing.
    assert rows["grass"]["grad_storage_bytes"] < 0.5 * rows["adamw"]["grad_storage_bytes"]
    assert rows["adamw"]["grad_memory_bytes"] == 2 * model  # buckets + separate .grad tensors
    for name in ("adamw+bucket_view", "grass+bucket_view"):
        assert rows[name]["grads_are_bucket_views"], name
        assert rows[name]["grad_memory_bytes"] == model, name


# ----------------------------------------------------------------------------- FSDP2
@pytest.mark.parametrize("active_layers", [1, 2])
def test_fsdp2_importance_and_training_match_one_process(pool, active_layers):
    steps = 24
    kwargs = {"probe_steps": 2, "switch_every": 3, "update_every": 2, "active_layers": active_layers}
    outcomes = pool.run("fsdp_train", steps=steps, **kwargs)
    values = [o.unwrap() for o in outcomes]
    assert all(v["param_types"] == ["DTensor"] for v in values)  # really sharded
    assert _actives(values[0]["history"]) == _actives(values[1]["history"])
    # Norms are all-reduced from the shards: the same scores on both ranks, bit for bit.
    assert torch.equal(_importances(values[0]["history"]).nan_to_num(-1),
                       _importances(values[1]["history"]).nan_to_num(-1))
    ref = H.train_reference(steps, d=H.FSDP_D, **kwargs)
    _assert_matches_reference(outcomes, ref, atol=1e-6)


def test_fsdp2_communication_of_frozen_blocks(pool):
    """FSDP2 reduce-scatters only the gradients that exist: frozen blocks cost none. All-gathers are
    unchanged (every block is gathered in forward and again in backward, which passes through it)."""
    out = pool.values("fsdp_comm", steps=6)[0]
    model, block = out["model_bytes"], out["block_bytes"]
    assert out["adamw"]["reduce_scatter"] == model
    assert out["grass"]["reduce_scatter"] == model - 3 * block  # 1 of 4 blocks + the outside
    assert out["grass"]["step1"]["reduce_scatter"] == model  # nothing frozen before the end of step 1
    assert out["grass"]["all_gather"] == out["adamw"]["all_gather"] == 2 * model - (model - 4 * block)
    # Gradient memory: a rank holds gradient shards only for parameters that have a gradient.
    assert out["adamw"]["grad_bytes_after_last_backward"] == model // 2
    assert out["grass"]["grad_bytes_after_last_backward"] == (model - 3 * block) // 2


def test_fsdp2_optimizer_built_before_fully_shard_is_refused(pool):
    for out in pool.values("fsdp_built_before_sharding"):
        assert out["error"] is not None and "replaced after the optimizer was built" in out["error"], out


def test_fsdp2_resume_from_per_rank_torch_save(pool, tmp_path):
    """torch.save of model.state_dict() and opt.state_dict() per rank (DTensors inside), loaded with
    weights_only=True into a fresh model and optimizer: the continued run is bit-identical."""
    for out in pool.values("fsdp_resume_torch_save", tmpdir=str(tmp_path), steps=14, stop=6, weights_only=True):
        assert out["load_error"] is None, out
        assert "DTensor" in out["state_types"]
        assert out["resumed_step"] == 6
        assert out["equal"], out["max_diff"]


def test_fsdp2_resume_with_distributed_checkpoint(pool, tmp_path):
    """The DCP recipe of docs/guides/fsdp2.md (base optimizer through DCP, "grass" entry on the side)."""
    for out in pool.values("fsdp_resume_dcp", tmpdir=str(tmp_path), steps=14, stop=6):
        assert out["resumed_step"] == 6
        assert out["equal"], out["max_diff"]


def test_fsdp2_dcp_helpers_on_grassadamw_itself(pool, tmp_path):
    """What docs/guides/fsdp2.md warns about, as torch 2.13 does it: get_optimizer_state_dict(model, opt)
    drops the "grass" entry, and calls opt.step() when there is neither state nor gradient (a probing
    step with zero gradients is counted); set_optimizer_state_dict calls step() on a fresh optimizer."""
    for out in pool.values("fsdp_dcp_probe", tmpdir=str(tmp_path)):
        assert out["keys_after_training"] == ["param_groups", "state"]  # no "grass"
        assert out["probing_steps_before_after_get"] == (1, 2)
        assert out["base_while_probing_steps_and_states"] == (1, 20)  # no GRASS step, but state for all 20
        assert out["fresh_steps_after_set"] == 1
        assert out["set_error"].startswith("RuntimeError: Missing optimizer state for parameter"), out["set_error"]
        assert out["set_nonstrict_error"].startswith("ValueError: Invalid state_dict: it has no 'grass' entry")


def test_fsdp2_offload_is_refused(pool):
    for out in pool.values("fsdp_offload"):
        assert out.startswith("ValueError: Invalid offload: 'inactive' with sharded"), out


# ----------------------------------------------------------------------------- the examples
def _torchrun(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(H.ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(H.free_port()),
           script, *args]
    proc = subprocess.run(cmd, cwd=H.ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _losses(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step\s+\d+ .*loss ([\d.]+)", out, re.M)]


def test_example_ddp_quick():
    out = _torchrun("examples/ddp.py", "--quick").stdout
    losses = _losses(out)
    assert len(losses) >= 2 and losses[-1] < losses[0], out
    assert "parameters identical on all ranks: True" in out, out
    assert re.search(r"active sets in order \(probing all blocks, then \d+ changes\):", out), out


def test_example_fsdp2_quick(tmp_path):
    out = _torchrun("examples/fsdp2.py", "--quick", "--check-resume", "--ckpt-dir", str(tmp_path)).stdout
    losses = _losses(out)
    assert len(losses) >= 2 and losses[-1] < losses[0], out
    assert re.search(r"resumed from .* at step \d+", out), out
    assert "resumed run matches the uninterrupted one: True" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.pt", "rank1.pt"]
