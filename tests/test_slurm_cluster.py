"""The one-node test cluster itself: a trivial job runs, an oversized one is refused, and
stopping leaves no daemon, job step or job process behind."""

import time

import pytest

from tests.slurm_cluster import SlurmCluster, SlurmError, ensure_slurm_installed, pids_alive

pytestmark = pytest.mark.slow

JOB = """#!/bin/bash
#SBATCH --output=%x-%j.out
echo "batch got: $*"
srun --label printenv SLURM_PROCID
"""


def test_trivial_job_completes_and_stop_leaves_nothing(tmp_path):
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(f"NO REAL SLURM CLUSTER: {reason}")
    script = tmp_path / "job.sh"
    script.write_text(JOB)
    cluster = SlurmCluster(tmp_path / "cluster")
    with cluster:
        daemons = cluster.daemon_pids()
        assert sorted(daemons) == ["slurmctld", "slurmd"]
        assert pids_alive(daemons.values()) == sorted(daemons.values())

        job = cluster.submit(script, ["hello", "world"], sbatch_args=["--ntasks=2"])
        assert cluster.wait(job, timeout=120) == "COMPLETED", cluster.job_output(job) + cluster.logs()
        out = cluster.job_output(job)
        assert "batch got: hello world" in out
        ranks = sorted(line.split(":")[0].strip() for line in out.splitlines() if line[:1].isdigit())
        assert ranks == ["0", "1"], out

        # An unfit request (8 nodes on a 1-node cluster) is refused at submission, not left pending.
        with pytest.raises(SlurmError, match="sbatch refused"):
            cluster.submit(script, sbatch_args=["--nodes=8"])

        # A job still running at shutdown is cancelled and its processes end with the daemons.
        script.write_text(JOB.replace("printenv SLURM_PROCID", "sleep 600"))
        long_job = cluster.submit(script, sbatch_args=["--ntasks=2"])
        deadline = time.monotonic() + 60
        while cluster.job_info(long_job)["JobState"] != "RUNNING":
            assert time.monotonic() < deadline, cluster.job_info(long_job)
            time.sleep(0.2)
        assert len(cluster.leftover_pids()) > len(daemons)  # the job's own processes are found too
    assert pids_alive(daemons.values()) == []
    assert cluster.leftover_pids() == []
