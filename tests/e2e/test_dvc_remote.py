"""A shared DVC remote, as docs/tracking-and-team.md ("A shared DVC remote") sets it up: one person pushes,
a teammate's fresh clone pulls.

moto's S3-compatible server on 127.0.0.1 stands in for S3 or MinIO, a bare git repository in
tmp for the team's git server. Alice has the session's tiny pipeline run (conftest's tiny_baseline), pushes
its results and one queued experiment; Bob clones, pulls, and has her results and experiment
without running a stage.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import copy_baseline, run_queue, sh

pytestmark = pytest.mark.slow

BUCKET = "team-dvc"
# moto accepts any key pair; a real store's keys go to .dvc/config.local the same way (never committed).
CREDENTIALS = {"access_key_id": "alice-key", "secret_access_key": "alice-secret"}
EXPERIMENT = "fewer-resamples"


@pytest.fixture(scope="module")
def s3_url():
    """An S3-compatible server on a free port of 127.0.0.1 with an empty bucket, stopped even if a test fails."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=CREDENTIALS["access_key_id"],
                     aws_secret_access_key=CREDENTIALS["secret_access_key"]).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.stop()


def add_credentials(repo: Path) -> None:
    for key, value in CREDENTIALS.items():
        sh(["dvc", "remote", "modify", "--local", "storage", key, value], repo)


def exp_metrics(repo: Path, name: str, path: str) -> dict:
    """A metrics file as the experiment's own commit holds it."""
    ref = next(r for r in sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).split()
               if r.endswith(f"/{name}"))
    return json.loads(sh(["git", "show", f"{ref}:{path}"], repo))


@pytest.fixture(scope="module")
def origin(tmp_path_factory, tiny_baseline, s3_url) -> dict:
    """Alice's repository after the README's commands: results and one experiment pushed to git and the remote."""
    tmp = tmp_path_factory.mktemp("remote")
    alice = copy_baseline(tiny_baseline, tmp / "alice")  # her results of the tiny pipeline, committed
    git_server = tmp / "origin.git"
    sh(["git", "init", "-q", "--bare", str(git_server)], tmp)
    sh(["git", "remote", "add", "origin", str(git_server)], alice)

    sh(["dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/qlora-pipeline"], alice)
    sh(["dvc", "remote", "modify", "storage", "endpointurl", s3_url], alice)
    add_credentials(alice)
    assert "Data and pipelines are up to date" in sh(["dvc", "repro"], alice)
    sh(["git", "add", "-A"], alice)  # .dvc/config (dvc.lock and the metrics are committed with the results)
    sh(["git", "commit", "-qm", "results"], alice)
    assert "access_key" not in sh(["git", "show", "HEAD:.dvc/config"], alice)  # the keys stay local
    pushed = sh(["dvc", "push"], alice)
    assert re.search(r"\d+ files? pushed", pushed), pushed
    branch = sh(["git", "rev-parse", "--abbrev-ref", "HEAD"], alice).strip()
    sh(["git", "push", "-q", "origin", branch], alice)

    # A queued experiment re-runs risk alone (its resamples); its outputs land in the shared cache.
    sh(["dvc", "exp", "run", "--queue", "-n", EXPERIMENT, "-S", "risk.bootstrap_samples=40"], alice)
    status = run_queue(alice, timeout=600)
    assert re.search(rf"\b{EXPERIMENT}\b.*\bSuccess\b", status), status
    sh(["dvc", "exp", "push", "origin", EXPERIMENT], alice)
    return {"alice": alice, "git_server": git_server, "branch": branch}


@pytest.fixture(scope="module")
def bob(origin, tmp_path_factory) -> Path:
    """A teammate's fresh clone with his own credentials and the pushed data pulled."""
    bob = tmp_path_factory.mktemp("bob") / "repo"
    sh(["git", "clone", "-q", "--branch", origin["branch"], str(origin["git_server"]), str(bob)], bob.parent)
    sh(["git", "config", "user.email", "bob@example.com"], bob)
    sh(["git", "config", "user.name", "bob"], bob)
    add_credentials(bob)
    sh(["dvc", "pull", "--allow-missing"], bob)  # data/raw is not on the remote (push: false)
    return bob


def remote_keys(s3_url: str) -> set[str]:
    """The content hashes DVC's remote holds (files/md5/<2>/<30>)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id=CREDENTIALS["access_key_id"],
                      aws_secret_access_key=CREDENTIALS["secret_access_key"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in page.get("Contents", [])]
    return {"".join(key.split("/")[-2:]) for key in keys if "/files/md5/" in key}


def md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def test_the_raw_export_stays_off_the_remote_while_the_pseudonymized_data_is_on_it(origin, s3_url):
    alice, held = origin["alice"], remote_keys(s3_url)
    raw = sorted((alice / "data/raw").rglob("*.jsonl"))
    assert raw and not {md5(path) for path in raw} & held, "a file of data/raw reached the remote"
    for pushed in ("data/clean/conversations.jsonl", "data/splits/train.jsonl", "models/adapter/adapter_model.safetensors"):
        assert md5(alice / pushed) in held, pushed
    # The friends' names are in data/raw only: clean pseudonymized them (conftest's chat log: friend0-2).
    assert "friend0" in (alice / "data/raw/conversations.jsonl").read_text()
    assert "friend0" not in (alice / "data/clean/conversations.jsonl").read_text()


def test_a_fresh_clone_pulls_every_result_and_reruns_fetch_alone(origin, bob):
    assert "Cache and remote 'storage' are in sync" in sh(["dvc", "status", "-c"], origin["alice"])
    assert "Cache and remote 'storage' are in sync" in sh(["dvc", "status", "-c"], bob)
    for path in ("data/clean/conversations.jsonl", "data/splits/train.jsonl", "models/base", "models/adapter",
                 "reports/evaluate/samples.csv", "reports/risk.md"):
        assert (bob / path).exists(), path
    assert not (bob / "data/raw").exists()  # push: false
    for name in ("eval.json", "risk.json"):
        assert (bob / "metrics" / name).read_text() == (origin["alice"] / "metrics" / name).read_text()

    # Only fetch's output is missing (train-adapter's resume checkpoints are a working folder, no
    # output): `dvc repro` makes data/raw again from the source in git, byte for byte, and runs nothing else.
    repro = sh(["dvc", "repro"], bob)
    assert re.findall(r"Running stage '([\w-]+)'", repro) == ["fetch"], repro
    assert md5(bob / "data/raw/conversations.jsonl") == md5(origin["alice"] / "data/raw/conversations.jsonl")
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], bob)


def test_a_pushed_experiment_reaches_the_teammate(origin, bob):
    sh(["dvc", "exp", "pull", "origin", EXPERIMENT], bob)
    assert EXPERIMENT in sh(["dvc", "exp", "list", "--all-commits"], bob)
    expected = exp_metrics(origin["alice"], EXPERIMENT, "metrics/risk.json")
    assert json.loads((bob / "metrics/risk.json").read_text()) != expected  # the baseline's until applied
    sh(["dvc", "exp", "apply", EXPERIMENT], bob)
    assert json.loads((bob / "metrics/risk.json").read_text()) == expected
    assert yaml.safe_load((bob / "params.yaml").read_text())["risk"]["bootstrap_samples"] == 40


def test_a_shared_folder_remote_works_the_same(origin, tmp_path_factory):
    """The README's other remote: a folder every teammate can reach (a NAS mount, a shared disk)."""
    alice, folder = origin["alice"], tmp_path_factory.mktemp("shared") / "dvc-store"
    sh(["dvc", "remote", "add", "-d", "shared", str(folder)], alice)
    sh(["dvc", "push"], alice)
    sh(["git", "commit", "-qam", "the team's remote is the shared folder"], alice)
    sh(["git", "push", "-q", "origin", origin["branch"]], alice)

    carol = folder.parent / "carol"
    sh(["git", "clone", "-q", "--branch", origin["branch"], str(origin["git_server"]), str(carol)], folder.parent)
    sh(["dvc", "pull", "--allow-missing"], carol)  # no credentials: a folder needs none; data/raw stays local
    assert "Cache and remote 'shared' are in sync" in sh(["dvc", "status", "-c"], carol)
    assert (carol / "models/adapter").is_dir() and (carol / "reports/risk.md").is_file()
