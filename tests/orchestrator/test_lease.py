"""One driver per run: the run's lease against the real S3 server's conditional writes."""

import concurrent.futures
import json
import time

import pytest

from data_pipelines.storage import read_bytes
from orchestrator.lease import LeaseHeld, LeaseLost, RunLease


@pytest.fixture(params=["s3", "folder"])
def lease_url(request, s3_server, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "run" / "lease.json")
    bucket = s3_server.create_bucket("vitscale-leases")
    return f"{bucket}/{request.node.name.replace('[', '-').replace(']', '')}/lease.json"


def lease(url, s3_server, ttl=60.0, log=None):
    return RunLease(url, ttl=ttl, factory=s3_server.client_factory() if url.startswith("s3://") else None,
                    log=log if log is not None else (lambda line: None))


def test_a_second_driver_is_refused_with_the_holders_name(lease_url, s3_server):
    first = lease(lease_url, s3_server)
    first.acquire()
    with pytest.raises(LeaseHeld, match=rf"another driver is running this run \(host \S+, pid \d+, started .* UTC; its "
                                        rf"lease {lease_url} renewed \d+ s ago\)"):
        lease(lease_url, s3_server).acquire()
    first.renew()  # still ours
    first.release()
    second = lease(lease_url, s3_server)
    second.acquire()  # released: free again
    second.release()


def test_a_stale_lease_is_taken_over_and_its_old_holder_learns_it(lease_url, s3_server):
    dead = lease(lease_url, s3_server, ttl=1.0)
    dead.acquire()
    time.sleep(2.5)  # not renewed for longer than its ttl: its driver died
    said = []
    alive = lease(lease_url, s3_server, ttl=1.0, log=said.append)
    alive.acquire()
    assert said and said[0].startswith("taking over the run from a driver that is gone (its lease last renewed")
    with pytest.raises(LeaseLost, match="taken over by another driver"):
        dead.renew()
    alive.renew()
    dead.release()  # lost: deletes nothing
    body = read_bytes(lease_url, s3_server.client_factory()) if lease_url.startswith("s3://") else open(lease_url, "rb").read()
    assert json.loads(body)["id"] == alive.holder["id"]
    alive.release()


def test_a_lease_whose_driver_process_is_gone_is_taken_over_at_once(lease_url, s3_server, tmp_path):
    """A driver SIGKILLed on this machine and started again: its lease names a pid that no longer
    exists, so the new driver need not wait out the ttl."""
    import subprocess
    import sys

    code = ("import sys; from orchestrator.lease import RunLease; from data_pipelines.s3 import S3ClientFactory; "
            "f = S3ClientFactory(endpoint_url=sys.argv[2], region='us-east-1', access_key_id=sys.argv[3], "
            "secret_access_key=sys.argv[4]); RunLease(sys.argv[1], factory=f if sys.argv[1].startswith('s3://') else None,"
            " log=print).acquire(); print('held', flush=True); sys.stdin.read()")
    driver = subprocess.Popen([sys.executable, "-c", code, lease_url, s3_server.endpoint_url, s3_server.access_key_id,
                               s3_server.secret_access_key], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert driver.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeld):
        lease(lease_url, s3_server).acquire()  # alive: refused
    driver.kill()
    driver.wait()
    said = []
    lease(lease_url, s3_server, log=said.append).acquire()  # ttl 60 s, and yet at once
    assert said and f"pid {driver.pid}" in said[0]


def test_of_drivers_taking_over_a_stale_lease_at_once_one_wins(s3_server):
    url = f"{s3_server.create_bucket('vitscale-leases')}/race/lease.json"
    lease(url, s3_server, ttl=1.0).acquire()
    time.sleep(2.5)
    contenders = [lease(url, s3_server, ttl=30.0) for _ in range(6)]

    def take(contender):
        try:
            contender.acquire()
            return True
        except LeaseHeld:
            return False

    with concurrent.futures.ThreadPoolExecutor(len(contenders)) as pool:
        won = list(pool.map(take, contenders))
    assert won.count(True) == 1, won
    winner = contenders[won.index(True)]
    assert json.loads(read_bytes(url, s3_server.client_factory()))["id"] == winner.holder["id"]
