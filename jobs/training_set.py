"""Job entry point for the 'training_set' stage.

    spark-submit jobs/training_set.py --config conf/local.yaml [--set key=value ...]
    ray job submit --working-dir . -- python jobs/training_set.py --config conf/cluster.yaml
"""
import sys

from causalrec.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("training_set"))
