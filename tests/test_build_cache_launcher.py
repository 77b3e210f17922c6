"""`python -m audio_gen.build_cache` under a launcher: with torchrun's (or Slurm's) variables and no shard on the
command line, each process builds its own shard; two such processes, run at the same time, fill one cache that
verifies, merges and equals a single-process build.  Contradictions are one-line errors."""

import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from ith_common.cache import CacheReader, shard_of_key
from ith_common.errors import UserError
from audio_gen.build_cache import SHARD_KEYS, apply_launcher, explicit_shard_keys, launcher_shard
from tests.test_build_cache import FAST, REPO, cache_contents, env, inputs, run_build, summary_of  # noqa: F401

TONE = ("--config.encoder=logmel", "--config.num_tokens=8", "--config.device=auto")
LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def clean(env):
    """The test environment without any launcher variable this test run itself may have inherited."""
    return {k: v for k, v in env.items() if k not in LAUNCHER_NAMES}


def command(*args):
    return [sys.executable, "-m", "audio_gen.build_cache", "--config", "configs/gen.py:tiny,tone", *FAST, *TONE,
            *map(str, args)]


def verify_cli(cache_dir):
    return subprocess.run([sys.executable, "-m", "audio_gen.cache", "verify", str(cache_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_two_launched_processes_fill_one_cache_equal_to_a_single_process_build(inputs, env, tmp_path):
    spans = f"--config.spans={inputs['spans']}"
    single = tmp_path / "single"
    run_build(clean(env), spans, f"--config.cache_dir={single}", *TONE, variant="tiny,tone")

    sharded = tmp_path / "sharded"
    processes = [subprocess.Popen(command(spans, f"--config.cache_dir={sharded}"), cwd=REPO, text=True,
                                  env={**clean(env), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for rank in (0, 1)]  # at the same time, as torchrun starts them
    outputs = [process.communicate(timeout=300) for process in processes]
    for rank, (process, (_, stderr)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, stderr
        # No CUDA on the test machine: device auto becomes the CPU, and the log line says where the shard came from.
        assert (f"build_cache: shard {rank} of 2 from torchrun's RANK={rank} WORLD_SIZE=2 LOCAL_RANK={rank}; "
                "device auto -> cpu") in stderr

    with CacheReader(single) as reader:
        owners = [shard_of_key(key, 2) for key in reader.keys()]
    for rank in (0, 1):
        summary = summary_of(sharded, f"-shard-{rank:05d}-of-00002")
        assert (summary["num_shards"], summary["shard_index"]) == (2, rank)
        assert summary["generated"] == owners.count(rank)
    verified = verify_cli(sharded)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    merged = tmp_path / "merged"
    result = subprocess.run([sys.executable, "-m", "audio_gen.cache", "merge", str(merged), str(sharded)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert verify_cli(merged).returncode == 0
    expected = cache_contents(single)
    for built in (sharded, merged):
        got = cache_contents(built)
        assert set(got) == set(expected) == inputs["prompts"]
        for prompt, entry in expected.items():
            # Tones and log-mel tokens do not depend on which other prompts share a batch: equal to float rounding.
            np.testing.assert_allclose(got[prompt].tokens.astype(np.float32), entry.tokens.astype(np.float32),
                                       atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(got[prompt].clap_scores, entry.clap_scores, atol=1e-5)


def test_slurm_variables_choose_the_shard(inputs, env, tmp_path):
    result = subprocess.run(command(f"--config.spans={inputs['spans']}", f"--config.cache_dir={tmp_path / 'c'}"),
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**clean(env), "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"})
    assert result.returncode == 0, result.stderr
    assert "shard 1 of 2 from Slurm's SLURM_PROCID=1 SLURM_NTASKS=2 SLURM_LOCALID=0" in result.stderr
    assert (summary_of(tmp_path / "c", "-shard-00001-of-00002")["shard_index"]) == 1


def test_explicit_shards_that_disagree_with_the_launcher_are_one_line(inputs, env, tmp_path):
    cache_dir = tmp_path / "c"
    result = subprocess.run(command(f"--config.spans={inputs['spans']}", f"--config.cache_dir={cache_dir}",
                                    "--num_shards", "3", "--shard_index", "1"),
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**clean(env), "RANK": "1", "WORLD_SIZE": "2"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: config key 'num_shards' is 3 on the command line but the launcher says 2 (torchrun: RANK=1 "
        "WORLD_SIZE=2); give matching values or drop --num_shards/--shard_index to take the launcher's")
    assert not cache_dir.exists()


def gen_config(**overrides):
    config = ml_collections.ConfigDict({"num_shards": 1, "shard_index": 0, "device": "auto", **overrides})
    config.lock()
    return config


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "environment variables RANK=2 WORLD_SIZE=2 (torchrun): expected 0 <= RANK < "
                                       "WORLD_SIZE"),
    ({"RANK": "1"}, "environment variable RANK is set but WORLD_SIZE is not; a torchrun launch sets both"),
    ({"SLURM_NTASKS": "4"}, "environment variable SLURM_NTASKS is set but SLURM_PROCID is not"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "environment variable RANK='one' (torchrun): expected an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, "environment variables SLURM_PROCID=0 SLURM_NTASKS=0 (Slurm): expected 0 <="),
])
def test_bad_launcher_variables_are_errors(environ, message):
    with pytest.raises(UserError, match="^" + re.escape(message)):
        apply_launcher(gen_config(), explicit=set(), environ=environ, log=lambda _: None)


def test_explicit_values_are_kept_when_they_agree_and_nothing_changes_without_a_launcher():
    lines = []
    config = gen_config(num_shards=4, shard_index=3, device="cpu")
    shard = apply_launcher(config, explicit={"num_shards", "shard_index"}, log=lines.append,
                           environ={"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (shard.launcher, shard.rank, shard.world_size, shard.local_rank) == ("torchrun", 3, 4, 1)
    assert (config.num_shards, config.shard_index, config.device) == (4, 3, "cpu")  # an explicit device stays
    assert lines == ["build_cache: shard 3 of 4 from torchrun's RANK=3 WORLD_SIZE=4 LOCAL_RANK=1; device cpu"]
    with pytest.raises(UserError, match="config key 'shard_index' is 0 on the command line but the launcher says 3"):
        apply_launcher(gen_config(), explicit={"shard_index"}, environ={"RANK": "3", "WORLD_SIZE": "4"})

    config = gen_config()
    assert apply_launcher(config, explicit=set(), environ={"ITH_JAX_CACHE": "x"}, log=lines.append) is None
    assert (config.num_shards, config.shard_index, config.device, len(lines)) == (1, 0, "auto", 1)
    # torchrun inside a Slurm step: torchrun's numbering is this process's.
    both = {"RANK": "5", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert (launcher_shard(both).rank, launcher_shard(both).world_size) == (5, 8)


def test_explicit_keys_are_read_from_every_command_line_form():
    assert explicit_shard_keys(["--config", "configs/gen.py:tiny", "--config.spans=a.jsonl"]) == set()
    assert explicit_shard_keys(["--num_shards", "2"]) == {"num_shards"}
    assert explicit_shard_keys(["--config.shard_index=1", "--config.num_shards", "2"]) == set(SHARD_KEYS)
    assert explicit_shard_keys(["--shard_index=1", "--config.num_shards_extra=3"]) == {"shard_index"}

