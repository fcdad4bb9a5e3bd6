"""jaxvid: text-to-video diffusion transformers in JAX."""

import os

__version__ = "0.1.0"

# imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp (so that Ctrl-C reaches only Python),
# which runs Python in the forked child before exec. In a multithreaded process (JAX, Grain's
# prefetch threads) that child can deadlock for good, and with it the loader thread waiting for
# ffmpeg (seen: a training run that never exited). Without it the fork and exec happen in C. A
# Ctrl-C in the terminal then reaches ffmpeg too: a clip being decoded at that moment counts as
# a bad file and is replaced; a video being written is not in the manifest and is redone on resume.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
