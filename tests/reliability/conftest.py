"""Make tests/ (nsutil, node, daemon_harness) and this directory (figures) importable."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
