import os
import sys

# ``python -m fastpull`` put the working directory first on sys.path: move it out of the way before
# anything else is imported, so that an isal.py or pycurl.py lying there is never run (here or in
# the unpack workers). A source checkout run in place keeps it last, to find fastpull itself.
if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
    cwd = sys.path.pop(0)
    if os.path.dirname(os.path.dirname(os.path.abspath(__file__))) == os.getcwd():
        sys.path.append(cwd)

from fastpull.cli.main import main  # noqa: E402

status = main()
# The command is done and has said what it had to: leave without finalizing the interpreter (the
# teardown of a pull's few hundred modules costs 15-20 ms), unless something may still need the
# exit's own clean-up (worker processes, an event loop, a thread still running; a profiler or a
# coverage tracer that writes at exit) or an output cannot be flushed (then the usual exit reports it).
if not {"multiprocessing", "asyncio"} & sys.modules.keys() and sys.getprofile() is None and sys.gettrace() is None:
    import threading

    if all(t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:
            pass
        else:
            if "logging" in sys.modules:
                sys.modules["logging"].shutdown()
            os._exit(status)
raise SystemExit(status)
