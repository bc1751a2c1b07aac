"""``vqkit ARGS`` under torchrun, with rank 1 failing at its third training batch: it raises
(``FAILURE=raise``) or stops answering for a minute (``FAILURE=hang``). The failing rank of
tests/test_distributed.py."""

import os
import sys
import time

from vqkit.cli.main import main
from vqkit.training import stage1 as train

if os.environ.get("RANK") == "1":
    real_to_model = train.to_model
    batches = []

    def to_model(images):
        if len(batches) == 2:
            if os.environ["FAILURE"] == "hang":
                time.sleep(60)
            raise OSError(f"cannot read batch {len(batches)} (injected)")
        batches.append(len(images))
        return real_to_model(images)

    train.to_model = to_model

sys.exit(main(sys.argv[1:]))
