import sys

from softprompt_jax.cli import main

sys.exit(main())
