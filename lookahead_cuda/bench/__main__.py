import sys

from lookahead_cuda.bench.cli import main

sys.exit(main())
