"""Job entry point for ``causalrec run``: every stage in order, skipping those up to date.

    causalrec run conf/local.yaml            # the laptop form
    spark-submit jobs/pipeline.py --config conf/cluster.yaml [--set key=value ...]

Its Ray stages connect to ``ray.address``.
"""
import sys

from causalrec.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("run"))
