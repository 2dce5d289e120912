"""structlora.repro: the reproduction of the paper (installed with ``pip install "structlora[repro]"``).

- `assets`: the offline models (incl. the pretrained ViT) and tasks with their splits
- `methods`: one registry of every compared method and the baselines peft lacks
- `engine`, `grid`: one training loop; RunSpec -> one JSON record per run, resumable
- `stats`, `claims`: paired statistics, the verdict rule and the claims ledger
- `paper`, `plots`: the paper's numbers and the figures
- `reproduce`, `cli`: the main job (``python -m structlora reproduce``)

Arrows point down only: notebooks -> structlora.repro -> structlora (the method never imports this).
"""
from . import executors  # noqa: E402,F401  registers run_grid(executor="submitit") (the grid never imports it)
