import sys

from eagle2_kernels.train import main

sys.exit(main())
