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


def test_gradient_and_state_memory_per_rank_under_ddp_and_fsdp2(pool):
    """benchmarks/dist_memory.py, 4 steps: which multi-GPU path saves what. DDP's buckets hold every
    gradient whatever is frozen; FSDP2 holds gradient shards of the trained blocks only; offloading
    under FSDP2 leaves the active blocks' state shards on the device; estimate_memory agrees per rank."""
    ranks = pool.values("dist_memory", steps=4)
    for result in ranks:
        rows = {r["method"]: r for r in result["rows"]}
        model = result["model_bytes"]
        adamw_ddp, grass_ddp, view = rows["adamw+ddp"], rows["grass+ddp"], rows["grass+ddp+bucket_view"]
        assert adamw_ddp["bucket_bytes"] == grass_ddp["bucket_bytes"] == view["bucket_bytes"] == model
        assert adamw_ddp["grad_memory_bytes"] == 2 * model  # buckets + separate .grad tensors
        assert model < grass_ddp["grad_memory_bytes"] < 2 * model and view["grad_memory_bytes"] == model
        ddp_inactive = rows["grass+ddp+inactive"]  # offloading under DDP: state parked, gradients unchanged
        assert ddp_inactive["grad_memory_bytes"] == grass_ddp["grad_memory_bytes"]
        assert ddp_inactive["state_device_bytes"] == ddp_inactive["estimate_state_bytes"]
        adamw_fsdp, grass_fsdp = rows["adamw+fsdp2"], rows["grass+fsdp2"]
        assert adamw_fsdp["weight_bytes"] == adamw_fsdp["grad_memory_bytes"] == model // 2  # even shards here
        for name in ("adamw+fsdp2", "grass+fsdp2", "grass+fsdp2+inactive", "grass+fsdp2+stream"):
            assert rows[name]["grad_memory_bytes"] == rows[name]["estimate_grad_bytes"], name
        assert grass_fsdp["grad_memory_bytes"] < 0.5 * adamw_fsdp["grad_memory_bytes"]
        inactive, stream = rows["grass+fsdp2+inactive"], rows["grass+fsdp2+stream"]
        assert adamw_fsdp["state_device_bytes"] == adamw_fsdp["estimate_state_bytes"]
        assert inactive["state_device_bytes"] == inactive["estimate_state_bytes"]  # 2 blocks + outside, sharded
        assert stream["state_device_bytes"] < inactive["state_device_bytes"] < grass_fsdp["state_device_bytes"]
        assert 0 < inactive["state_host_bytes"] <= inactive["host_buffer_bytes"] <= inactive["estimate_host_bytes"]
        assert 0 < stream["state_host_bytes"] <= stream["host_buffer_bytes"] <= stream["estimate_host_bytes"]
        for name, r in rows.items():
            if name.startswith("grass"):
                assert r[f"same_params_as_grass+{'fsdp2' if 'fsdp2' in name else 'ddp'}"], name
    assert [r["grad_memory_bytes"] for r in ranks[0]["rows"]] == [r["grad_memory_bytes"] for r in ranks[1]["rows"]]


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
    """The manual DCP recipe (base optimizer through torch's helpers, "grass" entry on the side), exact
    when saved after probing; save_checkpoint/load_checkpoint replace it (test below)."""
    for out in pool.values("fsdp_resume_dcp", tmpdir=str(tmp_path), steps=14, stop=6):
        assert out["resumed_step"] == 6
        assert out["equal"], out["max_diff"]


DCP_SAVE_AT = [(1, "zero_grad"), (4, "step"), (6, "backward")]  # probing, no state; right after a redraw; mid-window


@pytest.mark.parametrize(("wrapper", "offload"),
                         [("fsdp", None), ("ddp", None), ("fsdp", "inactive"), ("fsdp", "stream")])
def test_save_and_load_checkpoint_on_two_ranks(pool, tmp_path, wrapper, offload):
    """grass_optim.save_checkpoint/load_checkpoint on 2 ranks with FSDP2 or DDP: a run that saves during
    probing (no state, no gradients: where torch's helpers step), right after a redraw and between
    backward and step is bit-identical to one that never saves; a fresh model and optimizer resumed
    from each save ends bit-identical too, with state (DTensor shards under FSDP2) for exactly the
    parameters that had some; ranks that disagree on the replicated state are refused at save. With
    FSDP2 and offloading, the parked shards are saved from, and loaded back into, host buffers."""
    outs = pool.values("dcp_save_and_load", wrapper=wrapper, tmpdir=str(tmp_path), steps=10, save_at=DCP_SAVE_AT,
                       offload=offload)
    for out in outs:
        assert out["actives"] == out["ref_actives"]
        assert torch.equal(out["rng"], out["ref_rng"])
        assert out["with_state"] == out["ref_with_state"]
        assert torch.equal(out["params"], out["reference"])
        assert sorted(out["resumed"]) == sorted(f"{i}-{w}" for i, w in DCP_SAVE_AT)
        assert out["saved_with_state"]["1-zero_grad"] == []
        for key, resumed in out["resumed"].items():
            assert resumed["with_state"] == out["saved_with_state"][key], key
            assert resumed["placed"] == out["saved_placed"][key], key  # parked state back in host buffers
            assert resumed["step"] == int(key.split("-")[0]) + (key.endswith("step")), key
            assert resumed["actives"] == out["ref_actives"][resumed["step"]:], key
            assert torch.equal(resumed["params"], out["reference"]), key
        assert ("DTensor" in out["resumed"]["6-backward"]["state_types"]) == (wrapper == "fsdp")
        assert (out["saved_placed"]["6-backward"][1] > 0) == (offload is not None)
        assert out["disagree_error"] is not None and "ranks disagree on the optimizer's replicated state" in \
            out["disagree_error"], out["disagree_error"]
    assert outs[0]["saved_with_state"] == outs[1]["saved_with_state"]


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


@pytest.mark.parametrize("mode", ["inactive", "stream"])
def test_fsdp2_offload_is_bit_identical_to_no_offload(pool, mode):
    """FSDP2 + offload: each rank parks its own shards of the inactive blocks' state; parameters and
    state equal FSDP2 without offload after every step, over several redraws (failed before:
    offloading sharded state was refused)."""
    for out in pool.values("fsdp_offload_equal", steps=16, mode=mode, active_layers=2, switch_every=2):
        assert out[f"history_{mode}"] == out["history_None"]
        assert len({tuple(a) for a in out["history_None"][2:]}) >= 3  # several redraws
        assert all(out["params_equal"]) and all(out["state_equal"]), (out["params_equal"], out["state_equal"])
        assert out["state_types"] == {"DTensor"} and out["state_like_param"]  # parked state is still a DTensor
        assert out[f"report_{mode}"].host_state_bytes > 0 and out[f"report_{mode}"].bytes_to_host > 0
        assert out["report_None"].host_state_bytes == 0


@pytest.mark.parametrize("mode", ["inactive", "stream"])
def test_fsdp2_offload_resume_from_per_rank_torch_save(pool, tmp_path, mode):
    """Per-rank torch.save with offload on (parked shards saved as host copies), loaded with
    weights_only=True: parked state goes back to host buffers, and the run continues bit-identically."""
    for out in pool.values("fsdp_resume_torch_save", tmpdir=str(tmp_path), steps=14, stop=7, weights_only=True,
                           offload=mode):
        assert out["load_error"] is None, out
        assert out["state_types"] == ["DTensor", "Tensor"]  # moments are DTensors, step a plain tensor
        saved, loaded = out["report_saved_loaded"]
        assert saved == loaded and loaded[1] > 0, out["report_saved_loaded"]  # same placement as when saved
        assert out["equal"] and out["state_equal"], out["max_diff"]


def test_parked_dtensor_shard_stays_on_the_host_when_the_mesh_is_on_another_device(pool):
    """On a GPU the mesh is on "cuda" and the host buffer is not: the parked state must be a DTensor
    over the host buffer itself (failed with DTensor.from_local, which moves its tensor to the
    mesh's device type: on a GPU, a stale device copy of the parked shard)."""
    for rank, out in enumerate(pool.values("offload_dtensor_of_another_device_type")):
        assert out["error"] is None, out["error"]
        assert out["parked"] == ("DTensor", "cuda", True, True, True, True), rank
        assert out["report"] == (4 * 3 * 4, 4 * 3 * 4)  # this rank's shard, parked, counted once
        assert out["back"] == ("DTensor", "cuda", True, False), rank


def test_fsdp2_offload_memory_report_and_estimate_per_rank(pool):
    """memory_report() on each rank counts its own shards, on the device and parked; estimate_memory(
    world_size=2, rank=r) predicts them exactly, with the uneven dim-0 cut of a 3-row head (failed
    before: memory_report counted the global size of a DTensor, and estimate_memory had no world_size)."""
    outs = pool.values("fsdp_offload_memory", steps=14, active_layers=2)
    for rank, out in enumerate(outs):
        assert out["reports"] == out["expected"], rank
        assert out["visited"] == [0, 1, 2, 3]
        est = out["estimate"]
        assert out["estimate_of_sharded_model"] == est  # global shapes, whether sharded already or not
        inactive = est["grass-inactive"]
        assert inactive["optimizer_state"] == max(r[0] for r in out["reports"]), rank
        assert inactive["host_state"] == out["reports"][-1][2], rank  # every block parked once
        assert inactive["gradients"] == max(out["grad_bytes"][3:]), rank  # after probing and the first step
        assert inactive["weights"] == out["weight_bytes"], rank
        assert est["adamw"]["optimizer_state"] == out["adamw_state_bytes"], rank
        assert est["adamw"]["gradients"] == out["adamw_grad_bytes"], rank
    assert outs[0]["outside_state_bytes"] > outs[1]["outside_state_bytes"]  # the head's 3 rows: 2 + 1


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # DCP


@pytest.mark.slow
def test_example_fsdp2_offload_quick(tmp_path):
    """examples/fsdp2.py with --offload inactive: parked shards, a resume that matches (~35 s)."""
    out = _torchrun("examples/fsdp2.py", "--quick", "--check-resume", "--offload", "inactive",
                    "--ckpt-dir", str(tmp_path)).stdout
    assert "resumed run matches the uninterrupted one: True" in out, out
    parked = re.search(r"optimizer state on rank 0: ([\d.]+) KiB on the device, ([\d.]+) KiB parked", out)
    assert parked is not None and float(parked.group(2)) > 0, out
