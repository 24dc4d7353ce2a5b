"""Running the pipeline on SLURM: rendering, preflight, and submitting the stages as a job DAG."""
