"""Engine test helpers: checkpoints written by tools/make_checkpoint.py into temp directories."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))

from make_checkpoint import write_checkpoint  # noqa: E402

torch.set_grad_enabled(False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny Llama checkpoint with a BPE tokenizer, written once per session."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", shape="tiny", seed=3)
