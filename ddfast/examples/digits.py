"""``ddfast distill-digits``: the older name of ``ddfast distill --dataset digits``.

Every flag of ``ddfast distill`` works; ``--epochs`` is kept as the old spelling of ``--eval-epochs``.

    ddfast distill-digits --method dm --ipc 10 --iterations 300
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..data import load_digits

NUM_CLASSES = 10


def load_digits_split(seed: int = 0, test_fraction: float = 0.3, device="cpu"
                      ) -> Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """((x_train, y_train), (x_test, y_test)): ``ddfast.data.load_digits`` as tensors."""
    ds = load_digits(seed, test_fraction).to(device)
    return (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)


def translate(argv: List[str]) -> List[str]:
    """Old flags to ``ddfast distill`` flags (``--epochs`` → ``--eval-epochs``), dataset fixed to digits."""
    out = ["--dataset", "digits"]
    for arg in argv:
        if arg == "--epochs":
            out.append("--eval-epochs")
        elif arg.startswith("--epochs="):
            out.append("--eval-epochs=" + arg.split("=", 1)[1])
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    import sys

    from ..distill import main as distill_main

    return distill_main(translate(sys.argv[1:] if argv is None else list(argv)), prog="ddfast distill-digits")
