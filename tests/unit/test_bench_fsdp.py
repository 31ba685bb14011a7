"""The memory accounting behind bench/fsdp.py (no Ray, no process group)."""

from __future__ import annotations

from bench.fsdp import PeakRss, model_state_bytes


def test_model_state_counts_weights_gradients_and_moments():
    import torch

    model = torch.nn.Linear(10, 10)
    optimizer = torch.optim.AdamW(model.parameters())
    assert model_state_bytes(model, optimizer) == 110 * 4  # weights only, before a step
    model(torch.ones(1, 10)).sum().backward()
    optimizer.step()
    # weights, gradients and two moments of 110 floats, and AdamW's step count per tensor
    assert model_state_bytes(model, optimizer) == 4 * 110 * 4 + 2 * 4


def test_peak_rss_sees_memory_held_while_it_runs():
    import numpy as np

    from tests.helpers import poll_until

    with PeakRss() as rss:
        before = PeakRss.now()
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        held = PeakRss.now()
        assert held - before > 48 * 2**20
        # the sampling thread sees it while it is held
        assert poll_until(lambda: rss.peak >= held, timeout_s=30)
        del block
    assert rss.peak >= held
