"""`python -m deepseek_mini [doctor]`: check this machine is ready for the course."""

import sys

from deepseek_mini.doctor import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
