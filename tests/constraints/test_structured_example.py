"""examples/structured.py in its --tiny mode: masked SMC returns only valid reviews."""

import importlib.util
import math
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "structured.py"


def test_structured_example_runs_tiny(capsys):
    spec = importlib.util.spec_from_file_location("example_structured", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(module.parse_args(["--tiny", "--device", "cpu"]))
    assert set(out) == {"sentence", "rating", "json"}
    for rows in out.values():
        assert rows["mask"]["valid"] == 1.0 and math.isfinite(rows["mask"]["log_Z"])
        assert rows["mask"]["ess"] > 1
        assert rows["factor"]["valid"] in (0.0, 1.0)  # valid, or every particle died
    # the format the LM never writes: rejection and the factor alone find nothing
    assert out["rating"]["rejection"]["valid"] == 0.0
    assert "Rating: " in capsys.readouterr().out
