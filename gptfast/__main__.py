"""``python -m gptfast ...`` == the ``gptfast`` console script."""
import sys

from gptfast.cli import main

sys.exit(main())
