"""Job entry point for the 'ingest' stage.

    spark-submit jobs/ingest.py --config conf/local.yaml [--set key=value ...]
    ray job submit --working-dir . -- python jobs/ingest.py --config conf/cluster.yaml
"""
import sys

from causalrec.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("ingest"))
