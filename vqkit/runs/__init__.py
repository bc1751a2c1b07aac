"""Run folders and what lives in them: build and load models and priors from their folders
(safetensors and JSON, atomic checkpoints), code sets, and the chain of priors that samples a
model's levels top-first."""

from vqkit.runs.checkpoint import (
                                   Checkpoint,
                                   CheckpointError,
                                   latest_checkpoint,
                                   load_model,
                                   load_prior,
                                   read_model_config,
)
from vqkit.runs.codes import CodeSet, CodeStoreError, extract_codes, load_codes, read_maps, save_maps
from vqkit.runs.generate import LevelPrior, chain_codes, check_chain, decode_codes, uniform_chain_codes

__all__ = ["Checkpoint", "CheckpointError", "CodeSet", "CodeStoreError", "LevelPrior", "chain_codes", "check_chain",
           "decode_codes", "extract_codes", "latest_checkpoint", "load_codes", "load_model", "load_prior",
           "read_maps", "read_model_config", "save_maps", "uniform_chain_codes"]
