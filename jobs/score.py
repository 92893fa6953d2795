"""Job entry point for the 'score' stage.

    ray job submit --address http://head:8265 --working-dir . -- \\
        python jobs/score.py --config conf/cluster.yaml [--set key=value ...]
"""
import sys

from causalrec.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("score"))
