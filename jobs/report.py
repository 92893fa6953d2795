"""Job entry point for the 'report' stage.

    python jobs/report.py --config conf/cluster.yaml [--set key=value ...]   # one process, no cluster
"""
import sys

from causalrec.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("report"))
