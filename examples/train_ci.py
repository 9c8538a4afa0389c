"""Train a family's ``ci`` preset on the synthetic point-mass environment and save it.

    python examples/train_ci.py dreamerv3 --steps 300 --out runs/dreamerv3-ci

Works for any registered family whose contract takes the point mass's observations (``"vector"``
of 4 floats and/or a 64x64x3 ``"image"``), a 2-D continuous action, and whose ``loss`` reads
``"reward"`` / ``"continue"`` targets (or ignores targets it does not declare). The saved
directory loads back with ``registry.load(out)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_env():
    """The one copy of the synthetic environment lives beside the tests; load it by path."""
    path = ROOT / "tests" / "synthetic_env.py"
    spec = importlib.util.spec_from_file_location("synthetic_env", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["synthetic_env"] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", help="registered family name, e.g. dreamerv3 or tdmpc2")
    parser.add_argument("--preset", default="ci")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=16, help="sequence length per batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--episodes", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    args = parser.parse_args(argv)

    import torch

    from worldflux_registry import registry

    env = load_env()
    torch.manual_seed(args.seed)
    model = registry.load(f"{args.family}:{args.preset}")
    contract = model.io_contract()
    names = set(contract.observation_names)
    if not names <= {"vector", "image"} or contract.action is None:
        raise SystemExit(f"{args.family}:{args.preset} does not take point-mass inputs: {names}")
    data = env.collect_dataset(args.episodes, 32, seed=args.seed, render="image" in names)
    evaluation = env.to_torch(
        env.collect_dataset(64, 32, seed=args.seed + 10_000, render="image" in names)
    )
    keys = env.batch_keys(model)
    with torch.no_grad():
        before = float(model.loss({k: evaluation[k] for k in keys}).loss)
    start = time.perf_counter()
    env.fit(
        model,
        data,
        args.steps,
        batch_size=args.batch_size,
        length=args.length,
        lr=args.lr,
        seed=args.seed,
        log_every=max(args.steps // 10, 1),
    )
    with torch.no_grad():
        after = float(model.loss({k: evaluation[k] for k in keys}).loss)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f}s")
    print(f"held-out loss {before:.4f} -> {after:.4f} ({100 * (1 - after / before):.0f}% lower)")
    if "vector" in contract.prediction_keys:
        predicted = env.one_step_prediction_error(model, evaluation)
        baseline = env.copy_last_error(evaluation)
        print(f"next-observation MSE {predicted:.4f} (copy-last baseline {baseline:.4f})")
    path = model.save_pretrained(args.out)
    print(f"saved to {path}")


if __name__ == "__main__":
    main()
