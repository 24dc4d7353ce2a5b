import sys

from nemo_rlhf.cli.main import main

sys.exit(main())
