"""Train the testbed LLaVA from scratch on synthetic scenes (CPU, minutes).

    python -m vtcompile.testbed.train --out DIR [--seed S] [--steps N] ...   (or: vtcompile testbed train)

Everything is trained (vision tower, projector, decoder) in up to four phases, each a ``Phase`` run by the
one loop in ``loop.py``: (1) the vision tower alone with per-patch probes, (2) end to end with the probes and a
decaying grounding loss, (3) a polish with the answer loss alone on count-heavy dialogues, optionally with
visual-exit training, (4) a finish: phase 3 again with every visual token (off by default). Every setting and
its default is a field of ``TrainConfig`` (``config.py``); the command line and recipe.json derive from it.
Data are generated in memory from the train split; a sample is a pure function of (split, seed, index), so a run
is deterministic for a seed (on the same CPU, torch build and thread count).

- ``config``: TrainConfig, the CLI derived from it
- ``data``: dialogue batches (ids, answer positions, grounding targets)
- ``forward``: the training forward (curriculum, visual-exit hooks), attention / compile / autocast contexts
- ``losses``: patch probes, grounding loss
- ``loop``: Phase, the loop, learning-rate schedule, optimizer, val checks
- ``phases``: the phases as Phases
- ``run``: train(), main()
"""

from .config import TrainConfig
from .run import main, train

__all__ = ["TrainConfig", "main", "train"]
