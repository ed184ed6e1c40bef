"""Make any device -> host read of a tensor fail, to prove a code path sync-free."""

from __future__ import annotations

import pytest
import torch

SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


def forbid_host_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    def sync(*_: object) -> None:
        raise AssertionError("host sync in a per-token path")

    for name in SYNCING_METHODS:
        monkeypatch.setattr(torch.Tensor, name, sync)
