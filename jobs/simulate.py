"""Job entry point for the 'simulate' stage.

    spark-submit jobs/simulate.py --config conf/local.yaml [--set key=value ...]
    ray job submit --working-dir . -- python jobs/simulate.py --config conf/cluster.yaml
"""
import sys

from causalrec.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("simulate"))
