"""A process that works through the downstream stage's claims of a study, for the claim tests:
``python -m tests.search.downstream_claimer URL STUDY LOG HOLD_S N [N ...]``.

Each claimed trial number is appended to LOG as soon as it is claimed; the work then takes
HOLD_S seconds (a long HOLD_S stands for an evaluation the test kills).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import optuna

from search.downstream_stage import enqueue_claims, process_claims, queue_study
from search.storage import open_storage


def main(argv: list[str]) -> None:
    url, name, log, hold_s, *numbers = argv
    study = optuna.load_study(study_name=name, storage=open_storage(url, create=False))
    queue = queue_study(study)
    wanted = [int(n) for n in numbers]
    enqueue_claims(queue, wanted)

    def work(number: int) -> None:
        with open(log, "a") as fh:
            fh.write(f"{number}\n")
        time.sleep(float(hold_s))

    process_claims(queue, wanted, work)
    Path(f"{log}.done").touch()


if __name__ == "__main__":
    main(sys.argv[1:])
