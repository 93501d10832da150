import sys

from pipeline.bench.endtoend import main

sys.exit(main())
