"""Job entry point for the 'features' stage.

    spark-submit jobs/features.py --config conf/local.yaml [--set key=value ...]
    ray job submit --working-dir . -- python jobs/features.py --config conf/cluster.yaml
"""
import sys

from causalrec.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("features"))
