"""distributed.py in one process: config resolution from the environment, data placement, metrics."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from sgcd_jax.parallel import distributed
from sgcd_jax.parallel.distributed import DistributedConfig, resolve_config


def test_nothing_set_means_single_process():
    assert resolve_config(DistributedConfig(), environ={}).cluster == "none"


def test_sgcd_env_vars_give_an_explicit_coordinator():
    env = {"SGCD_COORDINATOR_ADDRESS": "10.0.0.2:1234", "SGCD_NUM_PROCESSES": "4",
           "SGCD_PROCESS_ID": "3"}
    cfg = resolve_config(DistributedConfig(), environ=env)
    assert (cfg.cluster, cfg.coordinator_address, cfg.num_processes, cfg.process_id) == (
        "explicit", "10.0.0.2:1234", 4, 3)


def test_explicit_config_fields_win_over_environment():
    env = {"SGCD_COORDINATOR_ADDRESS": "a:1", "SGCD_NUM_PROCESSES": "4", "SGCD_PROCESS_ID": "3"}
    cfg = resolve_config(DistributedConfig(coordinator_address="b:2", process_id=0), environ=env)
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("b:2", 4, 0)


def test_slurm_variables_select_slurm_detection():
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
           "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_LOCALID": "0"}
    assert resolve_config(DistributedConfig(), environ=env).cluster == "slurm"


def test_single_task_slurm_job_stays_single_process():
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    assert resolve_config(DistributedConfig(), environ=env).cluster == "none"


def test_multihost_tpu_slice_is_auto_detected():
    env = {"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1", "TPU_WORKER_ID": "1"}
    assert resolve_config(DistributedConfig(), environ=env).cluster == "tpu"
    single_host = {"TPU_WORKER_HOSTNAMES": "localhost"}
    assert resolve_config(DistributedConfig(), environ=single_host).cluster == "none"


def test_sgcd_cluster_env_forces_the_mode_and_device_ids_are_parsed():
    env = {"SGCD_CLUSTER": "tpu", "SGCD_LOCAL_DEVICE_IDS": "0,1,2,3"}
    cfg = resolve_config(DistributedConfig(), environ=env)
    assert cfg.cluster == "tpu" and cfg.local_device_ids == (0, 1, 2, 3)
    assert resolve_config(DistributedConfig(), environ={"SGCD_CLUSTER": "none",
                                                        "SGCD_NUM_PROCESSES": "2"}).cluster == "none"
    with pytest.raises(ValueError, match="num_processes"):
        resolve_config(DistributedConfig(), environ={"SGCD_CLUSTER": "explicit"})
    with pytest.raises(ValueError, match="SGCD_CLUSTER"):
        resolve_config(DistributedConfig(), environ={"SGCD_CLUSTER": "k8s"})


def test_forced_slurm_without_variables_names_the_missing_ones():
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        resolve_config(DistributedConfig(cluster="slurm"), environ={"SLURM_JOB_ID": "1",
                                                                    "SLURM_NTASKS": "2"})


@pytest.mark.parametrize("kwargs, message", [
    ({"cluster": "mpi"}, "cluster"),
    ({"cluster": "explicit", "coordinator_address": "h:1"}, "num_processes"),
    ({"heartbeat_timeout_s": 0}, "heartbeat_timeout_s"),
    ({"coordinator_address": "hostonly"}, "host:port"),
])
def test_invalid_config_is_rejected_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistributedConfig(**kwargs)


def test_non_integer_process_count_in_env_is_reported():
    with pytest.raises(ValueError, match="SGCD_NUM_PROCESSES"):
        resolve_config(DistributedConfig(), environ={"SGCD_NUM_PROCESSES": "two"})


def test_initialize_is_a_no_op_for_one_process():
    cfg = distributed.initialize(DistributedConfig(cluster="none"))
    assert cfg.cluster == "none" and not jax.distributed.is_initialized()


def test_process_shard_partitions_tasks_without_overlap():
    tasks = list(range(10))
    shards = [distributed.process_shard(tasks, i, 3) for i in range(3)]
    assert sorted(sum(shards, [])) == tasks
    assert shards[1] == [1, 4, 7]


def test_global_batch_is_sharded_over_data_and_keeps_values():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    local = {"tokens": np.arange(24, dtype=np.int32).reshape(8, 3), "reward": np.arange(8.0)}
    batch = distributed.global_batch(local, mesh, batch_axes=("data",))
    assert batch["tokens"].shape == (8, 3)
    assert batch["tokens"].sharding.spec == jax.sharding.PartitionSpec(("data",), None)
    assert len({s.index[0].start for s in batch["tokens"].addressable_shards}) == 4  # 4 row blocks
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])
    both = distributed.global_batch(local, mesh)  # default: split over data and fsdp, like sharding.py
    assert both["tokens"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert len({s.index[0].start for s in both["tokens"].addressable_shards}) == 8


def test_local_batch_size_rejects_uneven_split():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    assert distributed.local_batch_size(8, mesh) == 8
    with pytest.raises(ValueError, match="multiple of 4"):
        distributed.local_batch_size(6, mesh, batch_axes=("data",))
    with pytest.raises(ValueError, match="multiple of 8"):
        distributed.local_batch_size(12, mesh)


def test_reduce_metrics_single_process_is_identity_and_ratio_is_exact():
    assert distributed.reduce_metrics({"a": 2.0, "b": 3}, "sum") == {"a": 2.0, "b": 3.0}
    assert distributed.reduce_ratio({"loss": 6.0}, {"loss": 4.0}) == {"loss": 1.5}
    with pytest.raises(ValueError, match="op"):
        distributed.reduce_metrics({"a": 1.0}, "median")


def test_host_copy_keeps_local_arrays_whole():
    copied = distributed.fully_replicated_host_copy({"a": np.ones((2, 3)), "b": jax.numpy.zeros(4)})
    assert copied["a"].shape == (2, 3) and copied["b"].shape == (4,)


def test_main_process_only_runs_on_process_zero():
    calls = []
    wrapped = distributed.main_process_only(lambda x: calls.append(x) or x)
    assert wrapped(5) == 5 and calls == [5]
    distributed.barrier("noop")  # single process: returns immediately


def test_taken_coordinator_port_is_named_before_jax_tries_it():
    import socket

    with socket.socket() as blocker:
        blocker.bind(("0.0.0.0", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"coordinator port {port} is already in use"):
            distributed._check_coordinator_port_free(f"127.0.0.1:{port}")
    distributed._check_coordinator_port_free(f"127.0.0.1:{port}")  # free again once closed
