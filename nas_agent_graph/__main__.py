"""python -m nas_agent_graph: see cli.py."""
import sys

from nas_agent_graph.cli import main

if __name__ == "__main__":  # importing this module (a doc tool, an import-time probe) starts no search
    sys.exit(main())
