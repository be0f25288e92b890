"""The black-box test suite (see tests/harness.py for how servers are started)."""
