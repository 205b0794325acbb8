import os
import sys

import pytest

# tests import the project's top-level modules (model.py, sampler.py, ...) directly
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (CI does)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test; runs with --runslow (CI runs it)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
