import sys
from pathlib import Path

# the format tests share tests/data's helpers (demo tokenizer, record builders)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
