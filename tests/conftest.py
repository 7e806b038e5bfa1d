"""Offline settings and registry hygiene for every test; the model table lives in `testing_common`."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import attentiondrop_hf  # noqa: E402,F401
from attentiondrop_hf.variants import registered_variants  # noqa: E402

# Two threads on this project's 2-core machines; OMP_NUM_THREADS=1 when other jobs share the cores (threads that
# fight another process's run several times slower).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))


@pytest.fixture(autouse=True)
def restore_registries():
    """Tests may register variants and attention functions; put every registry back afterwards."""
    variants = dict(registered_variants())
    attention = dict(AttentionInterface._global_mapping)
    masks = dict(AttentionMaskInterface._global_mapping)
    yield
    registered_variants().clear()
    registered_variants().update(variants)
    AttentionInterface._global_mapping.clear()
    AttentionInterface._global_mapping.update(attention)
    AttentionMaskInterface._global_mapping.clear()
    AttentionMaskInterface._global_mapping.update(masks)


def pytest_terminal_summary(terminalreporter):
    """The architecture sweep's counts (tests/test_architectures.py), when it ran."""
    sweep = sys.modules.get("test_architectures")
    if sweep is not None and sweep.RESULTS:
        terminalreporter.write_line(sweep.summary())
