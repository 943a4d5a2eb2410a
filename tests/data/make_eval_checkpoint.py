"""Write tests/data/eval_debug_run: the documented debug run (apps/main/configs/debug.yaml, 300
steps on the synthetic story corpus) as a run folder holding only its final consolidated weights,
which tests/test_eval.py evaluates instead of training the model in every test session.

    python tests/data/make_eval_checkpoint.py     # rerun after a change of the model's weights or names

The weights are stored in bfloat16 (half the bytes; loading copies them into the fp32 model).
params.json names the repository's tokenizer by its relative path; the test points data.root_dir
at the corpus it writes (`write_corpus(..., "stories", seed=0)`, the one trained on here).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "data" / "eval_debug_run"
STEP = 300
TOKENIZER = "tokenizer/stories_sp2k.model"  # relative to the repository root (the eval command's cwd)


def main() -> None:
    sys.path.insert(0, str(REPO))
    from apps.main.train import MODEL_SPEC, MainTrainArgs
    from lingua.args import load_config
    from lingua.checkpoint import CONSOLIDATED_DIR, CONSOLIDATED_FILE, PARAMS_FILE, consolidate
    from lingua.synthetic import write_corpus
    from lingua.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_corpus(root / "data", "stories", seed=0)
        cfg = load_config(
            MainTrainArgs,
            str(REPO / "apps/main/configs/debug.yaml"),
            [f"dump_dir={root / 'run'}", f"data.root_dir={root / 'data'}", f"data.tokenizer.path={REPO / TOKENIZER}",
             f"steps={STEP}", "validation.every=0", f"checkpoint.dump.every={STEP}", "logging.freq=100"],
        )
        result = train(cfg, MODEL_SPEC)
        assert result.step == STEP and result.last_checkpoint is not None
        weights = torch.load(consolidate(result.last_checkpoint), map_location="cpu", weights_only=True)["model"]
        params = json.loads((result.last_checkpoint / PARAMS_FILE).read_text())

    params["dump_dir"] = "set by the test"
    params["data"]["root_dir"] = "set by the test"
    params["data"]["tokenizer"]["path"] = TOKENIZER
    target = OUT / "checkpoints" / f"{STEP:010d}" / CONSOLIDATED_DIR
    shutil.rmtree(OUT, ignore_errors=True)
    target.mkdir(parents=True)
    low = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in weights.items()}
    torch.save({"model": low}, target / CONSOLIDATED_FILE)
    (target / PARAMS_FILE).write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
    print(f"wrote {target} ({(target / CONSOLIDATED_FILE).stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
