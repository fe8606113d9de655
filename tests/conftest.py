import sys
from pathlib import Path

# Shared test helpers (tests/alignment_cases.py) are imported by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent))
