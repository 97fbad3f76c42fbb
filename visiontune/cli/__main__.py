"""`python -m visiontune.cli`, as the console script `visiontune`."""

from visiontune.cli import main

main()
