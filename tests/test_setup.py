"""The run setup both kinds of training share: the same checks on their configurations."""

from __future__ import annotations

import pytest

from vqkit.errors import ConfigError
from vqkit.training.prior import PriorTrainConfig
from vqkit.training.stage1 import TrainConfig

CONFIGS = [(TrainConfig, {"data": "x"}, "image_every"), (PriorTrainConfig, {"codes": "x"}, "eval_every")]


@pytest.mark.parametrize("cls, required, own", CONFIGS, ids=["stage1", "prior"])
def test_both_training_configs_refuse_the_same_bad_values(cls, required, own):
    cls(**required)  # the defaults are valid
    for bad in ({"steps": -1}, {"batch_size": 0}, {"lr": 0.0}, {"time_budget": 0.0}, {"checkpoint_every": 0},
                {"log_every": 0}, {"schedule": "step"}, {own: 0}):
        with pytest.raises(ConfigError):
            cls(**required, **bad)
    with pytest.raises(ConfigError, match=f"{own}=0"):
        cls(**required, **{own: 0})
