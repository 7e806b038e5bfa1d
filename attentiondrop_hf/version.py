"""The release, in one place (setup.cfg reads it; `config` writes it beside saved flags).

Bump it whenever the set of flags changes (`tests/test_versions.py` records the flags of every release): a
checkpoint's flags unknown to an install are dropped with a warning only when they were written by a newer release.
"""

__version__ = "0.3.0"
