"""Config validation: every class of bad input gets an error that names the key."""
import socket
from pathlib import Path

import pytest
import yaml

from fusion.config import ConfigError, load_config, parse_config
from experiments.local_runs import free_port
from fusion.topology import LaunchEnv, TopologyError, plan_ranks

ROOT = Path(__file__).resolve().parents[1]


def base(**sections):
    raw = {"target": "models/target", "trainer": {"lr": 1e-3}, "fusion": {"mode": "none"}}
    for key, value in sections.items():
        raw[key] = value
    return raw


def sources(*specs):
    return [dict(name=name, path=f"models/{name}", **extra) for name, extra in specs]


def parse(raw, overrides=None):
    return parse_config(raw, overrides, check_paths=False)


def test_defaults_fill_in_and_types_are_converted():
    config = parse(base(trainer={"lr": "1e-4"}))  # YAML reads 1e-4 as a string
    assert config.trainer.lr == pytest.approx(1e-4)
    assert config.trainer.micro_batch_size == 4
    assert config.selector.tau == pytest.approx(0.3) and config.selector.objective == "linucb"
    assert config.fusion.lam == pytest.approx(0.9)
    assert config.sources == ()
    assert not config.data.packing and config.data.min_piece_tokens == 16
    # Pieces are cut only with packing; null packs whole chunks, at any max_length.
    assert parse(base(data={"max_length": 24})).data.min_piece_tokens == 16
    assert parse(base(data={"packing": True, "max_length": 24, "min_piece_tokens": None})).data.min_piece_tokens is None


@pytest.mark.parametrize("selector, pool, expected", [
    ({}, 6, 2), ({}, 1, 1), ({"max_sources": 1}, 6, 1), ({"max_sources": None}, 3, 2),
    ({"min_sources": 3, "max_sources": 4}, 6, 3), ({"min_sources": 1}, 6, 1),
])
def test_two_sources_per_sequence_by_default_where_the_pool_allows(selector, pool, expected):
    config = parse(base(fusion={"mode": "predictive"}, sources=sources(*((f"s{n}", {}) for n in range(pool))), selector=selector))
    assert config.selector.sources_at_least(pool) == expected


@pytest.mark.parametrize("raw, key", [
    (base(trainr={"lr": 1.0}), "trainr: unknown key; did you mean 'trainer'?"),
    (base(trainer={"learning_rate": 1.0}), "trainer.learning_rate: unknown key"),
    (base(selector={"exploration": {"begin": 0.1}}), "selector.exploration.begin: unknown key"),
    (base(sources=[{"name": "a", "path": "p", "tp": 2}]), "sources[0].tp: unknown key"),
])
def test_unknown_keys_are_named(raw, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]").replace("?", r"\?")):
        parse(raw)


@pytest.mark.parametrize("raw, message", [
    (base(trainer={"lr": "fast"}), r"trainer\.lr: expected a number, got 'fast'"),
    (base(trainer={"max_steps": 1.5}), r"trainer\.max_steps: expected an integer"),
    (base(trainer={"micro_batch_size": True}), r"trainer\.micro_batch_size: expected an integer"),
    (base(fusion={"mode": "magic"}), r"fusion\.mode: 'magic' is not one of"),
    (base(trainer={"precision": "fp64"}), r"trainer\.precision: 'fp64' is not one of"),
    (base(data={"domains": "wiki"}), r"data\.domains: expected a list"),
    (base(data={"min_piece_tokens": True}), r"data\.min_piece_tokens: expected an integer"),
    (base(sources={"name": "a"}), r"sources: expected a list"),
    ({"trainer": {}}, r"target: required key is missing"),
    (base(sources=[{"name": "a"}]), r"sources\[0\]\.path: required key is missing"),
])
def test_wrong_types_are_named(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse(raw)


@pytest.mark.parametrize("raw, message", [
    (base(trainer={"lr": -1e-4}), r"trainer\.lr: must be > 0, got -0.0001"),
    (base(trainer={"max_steps": 0}), r"trainer\.max_steps: must be >= 1"),
    (base(trainer={"keep_last": 0}), r"trainer\.keep_last: must be >= 1 \(checkpoints kept\) or null \(keep all\), got 0"),
    (base(selector={"tau": 1.0}), r"selector\.tau: must be in \(0, 1\), got 1.0"),
    (base(selector={"tau": 0}), r"selector\.tau: must be in \(0, 1\)"),
    (base(selector={"optimism": -0.1}), r"selector\.optimism: must be >= 0"),
    (base(selector={"correlation": 1.0}), r"selector\.correlation: must be in \[0, 1\)"),
    (base(selector={"correlation": -0.2}), r"selector\.correlation: must be in \[0, 1\)"),
    (base(selector={"ridge": 0}), r"selector\.ridge: must be > 0"),
    (base(selector={"objective": "ucb"}), r"selector\.objective"),
    (base(fusion={"mode": "none", "lam": 1.5}), r"fusion\.lam: must be in \[0, 1\]"),
    (base(fusion={"mode": "none", "temperature": 0}), r"fusion\.temperature: must be > 0"),
    (base(selector={"exploration": {"start": 2}}), r"selector\.exploration\.start: must be in \[0, 1\]"),
    (base(fusion={"mode": "predictive"}), r"fusion\.mode: 'predictive' needs at least one entry under `sources`"),
    (base(fusion={"mode": "min_ce"}, sources=sources(("a", {}), ("a", {}))), r"sources: duplicate source name"),
    (base(fusion={"mode": "min_ce"}, sources=sources(("a", {"tensor_parallel": 0}))), r"sources\[0\]\.tensor_parallel: must be >= 1"),
    (base(fusion={"mode": "min_ce"}, sources=sources(("a", {})), selector={"min_sources": 2}),
     r"selector\.min_sources: 2 exceeds the number of sources \(1\)"),
    (base(selector={"min_sources": 2, "max_sources": 1}), r"selector\.max_sources: 1 is below selector\.min_sources"),
    (base(data={"max_length": 4}), r"data\.max_length: must be >= 8"),
    (base(data={"min_piece_tokens": 0}), r"data\.min_piece_tokens: must be >= 1 or null \(pack whole chunks\), got 0"),
    (base(data={"packing": True, "max_length": 24, "min_piece_tokens": 16}),
     r"data\.min_piece_tokens: 16 leaves no cut in rows of data\.max_length=24 tokens .*use at most 12, or null to pack whole chunks"),
    (base(topology={"prefetch_steps": -1}), r"topology\.prefetch_steps: must be >= 0"),
    (base(topology={"request_timeout_s": 0}), r"topology\.request_timeout_s: must be > 0 seconds"),
    (base(topology={"placement": "disaggregated"}, fusion={"mode": "min_ce", "offline": True}, sources=sources(("a", {}))),
     r"fusion\.offline: offline answers are read by the trainer; use placement: colocated"),
])
def test_impossible_values_are_named(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse(raw)


def test_missing_paths_are_named(tmp_path):
    raw = base(data={"corpus": str(tmp_path / "corpus")})
    raw["target"] = str(tmp_path / "no-model")
    with pytest.raises(ConfigError, match=r"target: model directory .*no-model.* does not exist"):
        parse_config(raw)
    (tmp_path / "model").mkdir()
    raw["target"] = str(tmp_path / "model")
    with pytest.raises(ConfigError, match=r"target: .* has no config.json"):
        parse_config(raw)
    (tmp_path / "model" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"target: .*config.json is not valid JSON"):
        parse_config(raw)
    (tmp_path / "model" / "config.json").write_text('{"vocab_size": 5, "max_position_embeddings": 64}')
    with pytest.raises(ConfigError, match=r"target: .* has no weights"):
        parse_config(raw)
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"target: .* has no tokenizer files"):
        parse_config(raw)
    (tmp_path / "model" / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"data\.max_length: 128 tokens exceed the context of target .*: 64"):
        parse_config(raw)
    raw["data"]["max_length"] = 64
    with pytest.raises(ConfigError, match=r"data\.corpus: .* does not exist"):
        parse_config(raw)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "rows.jsonl").write_text('{"text": "one row"}\n')
    raw["trainer"]["deepspeed_config"] = str(tmp_path / "zero9.json")
    with pytest.raises(ConfigError, match=r"trainer\.deepspeed_config: .*zero9.json.* does not exist"):
        parse_config(raw)
    raw["trainer"]["deepspeed_config"] = str(ROOT / "ds_configs" / "zero3.json")
    raw["fusion"] = {"mode": "all_uniform", "top_k": 6}
    raw["sources"] = [{"name": "small", "path": str(tmp_path / "model")}]
    with pytest.raises(ConfigError, match=r"fusion\.top_k: 6 exceeds the vocabulary of sources\[0\]\.path .*: 5 tokens"):
        parse_config(raw)
    raw["fusion"]["top_k"] = 5
    assert parse_config(raw).fusion.top_k == 5


def test_overrides_apply_in_order_and_are_validated():
    config = parse(base(), ["trainer.lr=2e-4", "trainer.max_steps=7", "selector.exploration.end=0.0"])
    assert config.trainer.lr == pytest.approx(2e-4) and config.trainer.max_steps == 7
    assert config.selector.exploration.end == 0.0
    with pytest.raises(ConfigError, match=r"trainer\.max_step: unknown key; did you mean 'max_steps'"):
        parse(base(), ["trainer.max_step=7"])
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        parse(base(), ["trainer.lr"])
    with pytest.raises(ConfigError, match=r"trainer\.lr: must be > 0"):
        parse(base(), ["trainer.lr=-1"])


def test_load_config_reports_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    assert load_config(good, check_paths=False).target == "models/target"


REPOSITORY_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_repository_configs_are_valid():
    # Found from this file, not the working directory. Paths are checked by the runs themselves;
    # here only keys, types and values.
    assert {"demo.yaml", "colocated.yaml", "compare.yaml", "baseline.yaml"} <= {path.name for path in REPOSITORY_CONFIGS}
    for path in REPOSITORY_CONFIGS:
        config = load_config(path, check_paths=False)
        assert config.target and config.run.output_dir, path


def plan(trainer_ranks, specs, placement="disaggregated", mode="predictive", world=None):
    config = parse(base(topology={"placement": placement, "trainer_ranks": trainer_ranks},
                        fusion={"mode": mode}, sources=sources(*specs)))
    expected = trainer_ranks + sum(extra.get("replicas", 1) * extra.get("tensor_parallel", 1) for _, extra in specs)
    return plan_ranks(config, expected if world is None and placement == "disaggregated" else world or trainer_ranks)


def test_plan_ranks_assigns_in_config_order():
    layout = plan(2, [("a", {"tensor_parallel": 2}), ("b", {"replicas": 2}), ("c", {})])
    assert [(role.name, role.ranks) for role in layout.roles] == [
        ("trainer", (0, 1)), ("a", (2, 3)), ("b", (4, 5)), ("c", (6,))]
    assert layout.roles[1].leaders == (2,)
    assert layout.roles[2].leaders == (4, 5)
    assert layout.roles[2].replica_ranks(1) == (5,)
    assert layout.role_of(5).name == "b"


def test_plan_ranks_colocated_uses_only_trainer_ranks():
    layout = plan(3, [("a", {"tensor_parallel": 2}), ("b", {})], placement="colocated")
    assert [(role.name, role.ranks) for role in layout.roles] == [("trainer", (0, 1, 2))]


def test_world_size_mismatch_shows_expected_layout():
    with pytest.raises(TopologyError) as error:
        plan(2, [("a", {"tensor_parallel": 2}), ("b", {})], world=4)
    message = str(error.value)
    assert "started 4 rank(s) but the config's topology needs 5" in message
    assert "a                ranks [2, 3]" in message and "deepspeed --num_gpus 5" in message


def test_launch_env_reads_deepspeed_torchrun_and_slurm_variables():
    launcher = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29600"}
    assert LaunchEnv.from_mapping(launcher) == LaunchEnv(3, 8, 1, "node0", 29600)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "MASTER_ADDR": "node0"}
    assert LaunchEnv.from_mapping(slurm) == LaunchEnv(5, 16, 5, "node0", 29500)
    # The launcher's own variables win over SLURM's (a deepspeed launch inside an allocation).
    assert LaunchEnv.from_mapping({**slurm, **launcher}).rank == 3
    assert LaunchEnv.from_mapping({}) == LaunchEnv(0, 1, 0, "127.0.0.1", 29500)
    with pytest.raises(TopologyError, match="malformed launcher environment"):
        LaunchEnv.from_mapping({"RANK": "zero"})


def test_free_port_leaves_the_store_port_free_too():
    """MASTER_PORT and MASTER_PORT + 1 (the run's store) can both be bound, even with the next port of
    a freshly taken one held open."""
    held = []
    try:
        for _ in range(50):
            port = free_port()
            for candidate in (port, port + 1):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", candidate))  # raises OSError if taken
                assert sock.getsockname()[1] == candidate
        assert len(held) == 100
    finally:
        for sock in held:
            sock.close()
