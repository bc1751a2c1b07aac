"""Training and evaluation: one loop and one run setup shared by stage 1 and the priors, the
test-set figures of a model and the held-out NLL of a prior, and the two-stage demo."""

from vqkit.training.evaluate import EvalResult, evaluate
from vqkit.training.loop import TrainingError, TrainResult, batch_indices
from vqkit.training.prior import PriorEvalResult, PriorTrainConfig, evaluate_prior, prior_config_for, train_prior
from vqkit.training.stage1 import TrainConfig, train

__all__ = ["EvalResult", "PriorEvalResult", "PriorTrainConfig", "TrainConfig", "TrainResult", "TrainingError",
           "batch_indices", "evaluate", "evaluate_prior", "prior_config_for", "train", "train_prior"]
