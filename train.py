"""Train an LTE model: ``python train.py recipe=NAME [key=value ...]``.

The same under ``accelerate launch train.py recipe=llama2`` and as ``lte train recipe=NAME``.
"""

import sys

from lte.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
