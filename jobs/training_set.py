"""Job entry point for the 'training_set' stage.

    spark-submit --py-files dist/causalrec-*.whl jobs/training_set.py --config conf/cluster.yaml [--set key=value ...]
"""
import sys

from causalrec.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("training_set"))
