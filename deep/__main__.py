import sys

try:
    import torch  # noqa: F401  (python -m deep trains networks: without PyTorch, one line instead of a traceback)
except ModuleNotFoundError:
    print("error: python -m deep needs PyTorch: pip install -e '.[torch]' (python -m nqp runs without it)",
          file=sys.stderr)
    sys.exit(2)

from .cli import main

sys.exit(main())
