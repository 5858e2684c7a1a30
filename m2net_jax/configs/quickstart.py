"""The README's main job: M²Net (ResNet-29 recognizer) on the embedded geo_twins set, 32 px.

  python -m m2net_jax.main --config=m2net_jax/configs/quickstart.py \
      --workdir=/tmp/m2net_quickstart

Builds geo_twins if it is missing, trains the three stages (pretrain -> policy -> finetune),
evaluates each on the test split and prints the table. Sized to finish in about 10 minutes on a
2-core CPU (README states the measured time). Narrower than the paper's networks (width 16) so
that it does; `m2net_jax/configs/r29.py:geo_twins` runs the full-width architecture.
"""

from m2net_jax.configs import base


def get_config():
    c = base.get_config()
    base.apply_variant(c, "geo_twins")
    c.recognizer.depth = 29
    c.recognizer.width = 16
    c.policy.width = 16
    c.stages.pretrain.update(epochs=8, batch_size=128, learning_rate=0.1, warmup_epochs=1)
    c.stages.policy.update(epochs=5, batch_size=128, learning_rate=1e-3)
    c.stages.finetune.update(epochs=3, batch_size=128, learning_rate=1e-4)
    c.sampling.curriculum_epochs = 0.5  # The 9 blocks all open after 4 of the 5 epochs.
    c.checkpoint.save_interval_steps = 100
    c.log.every_steps = 20
    return c
