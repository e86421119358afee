"""`python -m pipelines.show ...`: the command's short name; the tool is pipelines/tools/show.py."""
from pipelines.tools.show import main

if __name__ == "__main__":
    main()
