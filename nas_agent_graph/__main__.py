"""python -m nas_agent_graph: see cli.py."""
import atexit
import os
import sys
import threading

from nas_agent_graph.cli import main

code = main()
# Everything is written by now (atomic writes, databases closed, runs stopped). What is left is the
# interpreter's own teardown of torch, Optuna, SQLAlchemy and LangGraph, module by module: 1-2 s on a
# busy 2-core machine, paid by every session. So do what exit does before that teardown (join the
# threads, run the exit handlers, logging's flush among them), flush the streams and leave. An
# exception from main() still exits the usual way.
getattr(threading, "_shutdown", lambda: None)()
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
