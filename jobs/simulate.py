"""Job entry point for the 'simulate' stage.

    spark-submit --py-files dist/causalrec-*.whl jobs/simulate.py --config conf/simulated.yaml [--set key=value ...]
"""
import sys

from causalrec.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("simulate"))
