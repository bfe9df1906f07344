"""``python -m hf_knnlm``: the ``hf-knnlm`` command (also what ``accelerate launch -m hf_knnlm`` runs)."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())
