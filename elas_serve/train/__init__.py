"""Bundled trainer: corpus -> tokenizer -> token shards -> ELAS checkpoint.

`elas-serve data` fetches a public-domain corpus (corpus.py); `elas-serve train` (cli.py) builds a
`TrainConfig` (config.py), prepares tokenizer and shards (setup.py, data.py), builds and
initialises the model (presets.py) and runs the loop (trainer.py), evaluating (evaluate.py) and
logging (metrics.py) as it goes. Checkpoints are written by `elas_serve.models.save_checkpoint`
in the format `elas_serve.models.load_model` reads.
"""

from .config import TrainConfig
from .trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
