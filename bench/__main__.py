"""`python -m bench`: the benchmark's command line (also installed as `ptq-bench`)."""
from bench.run import main

main()
