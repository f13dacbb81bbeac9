"""`python -m elas_serve.train [train|data] ...` and `torchrun ... -m elas_serve.train ...`.

With no subcommand the arguments are the trainer's (`train` is implied), so
`torchrun --nproc_per_node 2 -m elas_serve.train --data ... --out ...` works.
"""

import sys

from .cli import main

argv = sys.argv[1:]
sys.exit(main(argv if argv[:1] in (["train"], ["data"]) else ["train", *argv]))
