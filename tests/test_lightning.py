"""Lightning: `configure_optimizers` returning GrassAdamW trains, and resumes exactly."""

from __future__ import annotations

import pytest
import torch

from grass_optim import GrassAdamW
from tests.helpers import batches, loss_fn, make_net

L = pytest.importorskip("lightning")


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net(num_layers=4)
        self.schedule: list[tuple[int, ...]] = []

    def training_step(self, batch, _):
        x, y = batch
        return loss_fn(self.net, x, y)

    def on_train_batch_end(self, *_):
        self.schedule.append(self.optimizers().optimizer.active_layer_indices)

    def configure_optimizers(self):
        opt = GrassAdamW(self, lr=1e-2, active_layers=2, switch_every=3, update_every=2, probe_steps=2, seed=0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader():
    # One batch per epoch: Lightning restarts a non-resumable loader's epoch on resume, so only a
    # checkpoint at an epoch boundary sees the same data; with one batch every step is one.
    data = batches(1)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


def _trainer(root, max_steps, **kwargs):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0, **kwargs)


def test_lightning_trains_and_resumes_bit_identically(tmp_path):
    torch.manual_seed(0)
    full = Module()
    every7 = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1,
                                                 filename="{step}")
    _trainer(tmp_path / "full", 14, callbacks=[every7]).fit(full, _loader())
    assert len(set(full.schedule)) > 1, "the active set should change during the run"

    resumed = Module()  # fresh weights and a fresh GrassAdamW: everything must come from the checkpoint
    _trainer(tmp_path / "resumed", 14, enable_checkpointing=False).fit(resumed, _loader(),
                                                                     ckpt_path=tmp_path / "step=7.ckpt")
    assert resumed.schedule == full.schedule[7:]
    for a, b in zip(full.net.parameters(), resumed.net.parameters(), strict=True):
        assert torch.equal(a, b)
