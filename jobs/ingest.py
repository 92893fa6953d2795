"""Job entry point for the 'ingest' stage.

    spark-submit --py-files dist/causalrec-*.whl jobs/ingest.py --config conf/cluster.yaml [--set key=value ...]
"""
import sys

from causalrec.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("ingest"))
