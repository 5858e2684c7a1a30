"""A tiny training job for tests that need a real process to kill, stop or run several of.

  python tests/smoke_job.py WORKDIR DATA_DIR [--kill-at STAGE:STEP] [--term-at STAGE:STEP]
      [--stages pretrain,policy] [--save-interval N]

Runs `train.train_and_evaluate` on the smoke config (ResNet-29 of width 8 on geo_twins/smoke).
`--kill-at` sends SIGKILL to itself when the stage reaches the step (0 = the stage's start,
before its first step; right after a save step = while that save may still be in flight);
`--term-at` sends SIGTERM instead (the preemption notice). Exits 0 when the job ends or stops
on request.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from m2net_jax import train  # noqa: E402
from m2net_jax.configs import r47  # noqa: E402


def smoke_config(data_dir, stages="pretrain,policy", save_interval=2):
    c = r47.get_config("smoke")
    c.recognizer.depth = 29
    c.data.data_dir = data_dir
    c.stages.run = stages
    c.checkpoint.save_interval_steps = save_interval
    return c


def _point(text):
    if text is None:
        return None
    stage, step = text.split(":")
    return stage, int(step)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("data_dir")
    parser.add_argument("--kill-at")
    parser.add_argument("--term-at")
    parser.add_argument("--stages", default="pretrain,policy")
    parser.add_argument("--save-interval", type=int, default=2)
    args = parser.parse_args()
    kill_at, term_at = _point(args.kill_at), _point(args.term_at)

    def on_step(stage, step):
        print(f"STEP {stage} {step}", flush=True)
        if (stage, step) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if (stage, step) == term_at:
            os.kill(os.getpid(), signal.SIGTERM)

    config = smoke_config(args.data_dir, args.stages, args.save_interval)
    try:
        train.train_and_evaluate(config, args.workdir, on_step=on_step)
    except train.Preempted as stop:
        print(f"PREEMPTED {stop}", flush=True)


if __name__ == "__main__":
    main()
