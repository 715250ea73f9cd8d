"""Several processes extracting into one store: claims, torchrun ranks killed and resumed, uncoordinated writers, verify."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import make_folder_dataset, throttled_environment
from pipeline import cache, files
from pipeline.cli import main
from pipeline.features import build_manifest, write_manifest
from pipeline.features.claims import ClaimError, ShardClaims
from pipeline.features.distribute import shard_order

N_SHARDS = 10  # 40 images in shards of 4

# ---------------------------------------------------------------- claims


def test_claims_are_all_or_nothing_and_released(tmp_path: Path) -> None:
    a, b = tmp_path / "v.000001", tmp_path / "v.000002"
    with ShardClaims(rank=0) as mine, ShardClaims(rank=1) as theirs:
        assert mine.try_claim([a])
        assert not theirs.try_claim([b, a])  # a is held by a live process: b is not kept either
        assert not b.exists()
        assert theirs.try_claim([b])
        mine.release([a])
        assert not a.exists() and theirs.try_claim([a])
    assert not a.exists() and not b.exists()  # released on exit


def test_a_claim_path_that_is_a_folder_is_one_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "center-3").mkdir()
    with (
        ShardClaims(rank=0) as claims,
        pytest.raises(ClaimError, match=r"center-3: not a claim file \(Is a directory\)"),
    ):
        claims.try_claim([tmp_path / "center-2", tmp_path / "center-3"])
    assert not (tmp_path / "center-2").exists()  # all or nothing


def test_a_claim_of_a_dead_process_is_taken_over_and_a_live_one_on_another_machine_only_when_stale(
    tmp_path: Path,
) -> None:
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    of_dead, elsewhere = tmp_path / "v.000001", tmp_path / "v.000002"
    of_dead.write_text(f"{files.HOST_TAG} {dead} 1\n")
    elsewhere.write_text("0badc0de 12345 2\n")  # another machine: its pid means nothing here
    with ShardClaims(rank=0, stale_after=60) as claims:
        assert claims.try_claim([of_dead])
        assert of_dead.read_text().split()[1] == str(os.getpid())
        assert not claims.try_claim([elsewhere])
        os.utime(elsewhere, (time.time() - 61, time.time() - 61))
        assert claims.try_claim([elsewhere])


def test_the_owner_refreshes_its_claims(tmp_path: Path) -> None:
    claim = tmp_path / "v.000003"
    with ShardClaims(rank=0, stale_after=0.2) as claims:
        assert claims.try_claim([claim])
        os.utime(claim, (0, 0))
        time.sleep(0.3)
        assert time.time() - claim.stat().st_mtime < 1.0


def test_each_rank_starts_with_its_own_shards_then_takes_the_others_from_the_end() -> None:
    assert shard_order(list(range(7)), 1, 3) == [1, 4, 6, 5, 3, 2, 0]
    assert shard_order([0, 1, 2], 0, 1) == [0, 1, 2]


# ---------------------------------------------------------------- several processes, real


def extract_args(model: Path, manifest: Path, out: Path) -> list[str]:
    return [
        "extract", "--split", "val", "--manifest", str(manifest), "--model", str(model), "--out", str(out),
        "--shard-rows", "4", "--chunk-rows", "2", "--batch-size", "2", "--device", "cpu", "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def split(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """40 images and a reference store extracted by one process."""
    base = tmp_path_factory.mktemp("distributed")
    root = make_folder_dataset(base / "data", n_per_label=10, seed=8)
    manifest = base / "manifests" / "val.csv"
    write_manifest(build_manifest("folder", root, "val"), manifest)
    reference = base / "reference.zarr"
    result = CliRunner().invoke(main, extract_args(tiny_clip_dir, manifest, reference))
    assert result.exit_code == 0, result.output
    return {"base": base, "manifest": manifest, "reference": reference, "throttle": base / "throttle"}


def environment(split: dict, delay: float, pids: Path) -> dict[str, str]:
    return throttled_environment(split["throttle"], delay, pids)


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "pipeline"]


def committed(store: Path) -> int:
    progress = store / "progress" / "center"
    if not (progress / "zarr.json").is_file():
        return 0
    return int(np.count_nonzero(zarr.open_array(progress, mode="r")[...]))


def assert_bit_identical(store: Path, reference: Path) -> None:
    for name in ("labels", "paths", "dataset", "valid", "error", "features/center", "progress/center"):
        got, want = zarr.open_array(store / name, mode="r")[...], zarr.open_array(reference / name, mode="r")[...]
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    for shard in range(N_SHARDS):
        shard_file = Path("features", "center", "c", str(shard), "0", "0")
        assert (store / shard_file).read_bytes() == (reference / shard_file).read_bytes(), shard_file
    assert cache.verify_store(store) == []
    assert not list(cache.claims_folder(store).glob("*"))  # every claim released


@pytest.mark.slow
def test_torchrun_rank_killed_mid_run_then_resumed_with_another_world_size_is_bit_identical(
    split: dict, tiny_clip_dir: Path
) -> None:
    out, pids = split["base"] / "torchrun.zarr", split["base"] / "pids"
    args = extract_args(tiny_clip_dir, split["manifest"], out)
    log = open(split["base"] / "torchrun.log", "wb")
    run = subprocess.Popen([*torchrun(2), *args], env=environment(split, 0.3, pids), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and run.poll() is None:
            rank1 = [p for p in pids.iterdir() if p.name.startswith("rank1-")]
            if rank1 and committed(out) >= 2:
                os.kill(int(rank1[0].name.split("-")[1]), signal.SIGKILL)
                break
            time.sleep(0.02)
        else:
            pytest.fail("torchrun ended or timed out before a rank could be killed:\n" + open(log.name).read())
        assert run.wait(timeout=120) != 0  # torchrun reports the killed rank and stops the other one
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    done = committed(out)
    assert 2 <= done < N_SHARDS, done

    resumed = subprocess.run([*torchrun(3), *args], env=environment(split, 0.0, pids), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    extracted = [int(n) for n in re.findall(r"(\d+) shards extracted", resumed.stderr)]
    assert len(extracted) == 3 and sum(extracted) == N_SHARDS - done, resumed.stderr
    assert_bit_identical(out, split["reference"])


@pytest.mark.slow
def test_two_uncoordinated_extractions_share_the_shards_and_end_in_a_correct_store(
    split: dict, tiny_clip_dir: Path
) -> None:
    out = split["base"] / "shared.zarr"
    env = environment(split, 0.2, split["base"] / "pids-shared")
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline", *extract_args(tiny_clip_dir, split["manifest"], out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=240) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    extracted = [int(re.search(r"(\d+) shards extracted", err).group(1)) for _, err in outputs]
    assert sum(extracted) == N_SHARDS, outputs  # each shard done once, by one of them
    assert_bit_identical(out, split["reference"])


# ---------------------------------------------------------------- cache verify


def test_cache_verify_catches_a_truncated_shard_a_missing_flag_and_nan_rows(tmp_path: Path) -> None:
    values = np.random.default_rng(0).standard_normal((12, 2, 4)).astype(np.float16)
    values[7, 0, 1] = np.nan
    identity = cache.placeholder_identity(2, 4, shard_rows=4, chunk_rows=2)
    store = cache.write_store(
        tmp_path / "s.zarr", identity, split="val", labels=[0, 1] * 6, paths=[f"{i}.png" for i in range(12)],
        datasets=["a"] * 12, features={"center": values},
    )  # fmt: skip
    shard_file = store / "features" / "center" / "c" / "0" / "0" / "0"
    shard_file.write_bytes(shard_file.read_bytes()[:50])
    (store / "progress" / "center" / "c" / "2").unlink()

    result = CliRunner().invoke(main, ["cache", "verify", str(store)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any("features/center shard 0" in line and "damaged index" in line for line in lines), result.output
    assert f"{store}: features/center shard 2 holds data but has no progress flag" in result.output
    assert "features/center shard 1: 1 valid row(s) hold NaN or Inf (first: row 7, 7.png)" in result.output
    assert "3 problem(s) found" in result.output

    result = CliRunner().invoke(main, ["cache", "verify", str(store), "--reset-bad"])
    assert result.exit_code == 1 and "reset 2 shard flag(s)" in result.output  # the damaged one and the NaN one
    assert cache.pending_shards(store, "center") == [0, 1, 2]


def test_cache_verify_says_ok_for_a_sound_store(tmp_path: Path) -> None:
    identity = cache.placeholder_identity(2, 4, shard_rows=4, chunk_rows=2)
    store = cache.write_store(
        tmp_path / "ok.zarr", identity, split="val", labels=[0, 1, 0], paths=["a.png", "b.png", "c.png"],
        datasets=["a"] * 3, features={"center": np.ones((3, 2, 4))},
    )  # fmt: skip
    result = CliRunner().invoke(main, ["cache", "verify", str(store)])
    assert result.exit_code == 0 and result.output.strip() == f"{store}: OK"
