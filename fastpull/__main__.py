import os
import sys

# ``python -m fastpull`` put the working directory first on sys.path: move it out of the way before
# anything else is imported, so that an isal.py or pycurl.py lying there is never run (here or in
# the unpack workers). A source checkout run in place keeps it last, to find fastpull itself.
if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
    cwd = sys.path.pop(0)
    if os.path.dirname(os.path.dirname(os.path.abspath(__file__))) == os.getcwd():
        sys.path.append(cwd)

from fastpull.cli.main import run  # noqa: E402

run()
