#!/usr/bin/env python3
"""Start the lip-sync server: `python run_server.py` serves http://127.0.0.1:8080/ with the embedded
avatar and the no-weights renderer; `--checkpoint wav2lip_gan.pth` switches to Wav2Lip. See --help."""
import sys

from server.runner import main

if __name__ == "__main__":
    sys.exit(main())
