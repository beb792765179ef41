"""Course assignments made from this repository: `python course.py list | make DIR | grade [DIR]` (see course/)."""
import sys

from course.tool import main

if __name__ == "__main__":
    sys.exit(main())
