"""Job entry point for 'doctor': print the Spark master, Delta backend, Ray address and model path.

    spark-submit --master yarn jobs/doctor.py --config conf/cluster.yaml
"""
import sys

from causalrec.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("doctor"))
