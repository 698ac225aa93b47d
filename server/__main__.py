"""`python -m server`: same as run_server.py."""
import sys

from server.runner import main

sys.exit(main())
