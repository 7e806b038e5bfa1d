"""Every release records its flags: a checkpoint's flags unknown to an install are dropped (with a warning) only when
a newer release wrote them, so a release that changes the flag set without a new version number would make its own
checkpoints unreadable by an install of the same number. This test fails until the version is bumped and the new
flag set recorded here (and in CHANGELOG.md)."""

import dataclasses
import os

import pytest

from attentiondrop_hf import AttentionDropConfig, __version__
from attentiondrop_hf.config import VERSION_KEY
from attentiondrop_hf.variants import registered_variants

BUILT_IN_VARIANTS = ("blur", "blur2d", "hard")
# Every flag of every release, with its default: the common flags, then each built-in variant's options.
FLAGS_OF_RELEASE = {
    "0.3.0": {
        "variant": "hard",
        "targets": None,
        "layers": None,
        "base_attn_implementation": None,  # 0.2.0: "sdpa"; None = the model's own implementation
        "schedule": "constant",
        "schedule_warmup": 0.1,
        "depth_rule": "uniform",
        "blur_width": 5,
        "blur_sigma_min": 0.0,
        "blur_sigma_max": 1.0,
        "blur_sigma_per": "example",
        "blur2d_width": 3,
        "blur2d_sigma_min": 0.0,
        "blur2d_sigma_max": 1.0,
        "blur2d_prefix_tokens": None,
        "blur2d_grid": None,
        "p": 0.1,
        "top_k": 8,
        "hard_fill": "zero",
    },
}


def current_flags() -> dict:
    flags = {f.name: f.default for f in dataclasses.fields(AttentionDropConfig) if f.init}
    for name in BUILT_IN_VARIANTS:
        flags.update({f.name: f.default for f in dataclasses.fields(registered_variants()[name].options_class)})
    return flags


def test_the_flags_of_this_release_are_recorded():
    assert __version__ in FLAGS_OF_RELEASE, f"record the flags of {__version__} in FLAGS_OF_RELEASE"
    assert current_flags() == FLAGS_OF_RELEASE[__version__], (
        "the flag set or a default changed: bump attentiondrop_hf/version.py, record the new flags here, and say what "
        "changed in CHANGELOG.md"
    )


def test_the_changelog_has_an_entry_for_this_release():
    path = os.path.join(os.path.dirname(__file__), "..", "CHANGELOG.md")
    with open(path, encoding="utf-8") as handle:
        assert f"## {__version__}" in handle.read()


def test_flags_written_by_a_newer_release_are_dropped_and_by_this_one_refused():
    newer = {**AttentionDropConfig().to_dict(), "flag_of_the_future": 1, VERSION_KEY: "99.0"}
    with pytest.warns(UserWarning, match=r"dropping flags this version .* does not know: \['flag_of_the_future'\]"):
        AttentionDropConfig.from_dict(newer)
    with pytest.raises(ValueError, match=r"unknown AttentionDrop flag\(s\) \['flag_of_the_future'\]"):
        AttentionDropConfig.from_dict({**newer, VERSION_KEY: __version__})
