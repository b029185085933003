"""python -m nas_agent_graph: see cli.py."""
import sys

from nas_agent_graph.cli import main

sys.exit(main())
