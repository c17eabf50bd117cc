"""broker/auth.py without a server: the roles' permissions, the credential files, and what a
service passes to nats-py. (tests/mesh/test_broker_auth.py tries them against nats-server.)"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from broker import auth
from broker.server import ServerOptions, config_text
from broker.subjects import Subjects
from natron.cli import creds

pytestmark = pytest.mark.unit

SUBJECTS = Subjects()


def allowed(role: auth.Role, kind: str) -> list[str]:
    return list(auth.permissions(role, SUBJECTS)[kind]["allow"])


def test_a_client_publishes_inference_and_cancellations_and_writes_nothing() -> None:
    publish = allowed("client", "publish")
    assert "natron.infer.>" in publish and "natron.cancel.>" in publish
    assert not [s for s in publish if s.startswith(("$KV.", "$O.", "natron.ctl", "_INBOX", "$JS.ACK"))]
    assert not [s for s in publish if s.startswith("$JS.API.") and ".DELETE." in s and "CONSUMER" not in s]
    assert not [s for s in publish if "STREAM.CREATE" in s or "STREAM.UPDATE" in s or "PURGE" in s]


def test_a_client_may_not_subscribe_where_the_services_receive() -> None:
    block = auth.permissions("client", SUBJECTS)["subscribe"]
    assert block["allow"] == ["_INBOX.>"]
    assert block["deny"] == ["_INBOX.natron.>"]


@pytest.mark.parametrize("role", ["gateway", "worker", "orchestrator", "router"])
def test_each_service_receives_only_on_its_own_inboxes(role: auth.Role) -> None:
    inboxes = [s for s in allowed(role, "subscribe") if s.startswith("_INBOX")]
    assert inboxes == [f"_INBOX.natron.{role}.>"]


@pytest.mark.parametrize("role", ["client", "gateway", "worker", "orchestrator"])
def test_only_the_router_administers_jetstream_and_writes_model_records(role: auth.Role) -> None:
    publish = allowed(role, "publish")
    assert "$JS.API.>" not in publish and ">" not in publish
    assert "$KV.natron_models.>" not in publish
    assert "$JS.API.>" in allowed("router", "publish")
    assert "$KV.natron_models.>" in allowed("router", "publish")


def test_workers_take_work_and_answer_but_not_on_the_routers_inbox() -> None:
    block = auth.permissions("worker", SUBJECTS)["publish"]
    assert "$JS.API.CONSUMER.MSG.NEXT.NATRON_INFER.>" in block["allow"]
    assert "$JS.ACK.NATRON_INFER.>" in block["allow"]
    assert block["deny"] == ["_INBOX.natron.router.>"]
    assert "natron.ctl.load" not in allowed("worker", "subscribe")
    # The orchestrator holds no model files: it may not read the model store.
    assert any("OBJ_natron_files" in s for s in block["allow"])
    assert not any("OBJ_natron_files" in s for s in allowed("orchestrator", "publish"))


def test_a_prefix_keeps_deployments_apart() -> None:
    other = auth.permissions("gateway", Subjects("edge"))
    text = json.dumps(other)
    assert "natron" not in text
    assert "edge.infer.>" in other["publish"]["allow"]


def test_credentials_are_private_files_made_once(tmp_path: Path) -> None:
    directory = tmp_path / "creds"
    first = auth.ensure_credentials(directory)
    assert set(first) == set(auth.ROLES)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for role in auth.ROLES:
        path = auth.seed_path(directory, role)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().startswith("SU")
        assert first[role].startswith("U") and first[role] not in path.read_text()
    # Kept: services started with the earlier files still connect.
    assert auth.ensure_credentials(directory) == first
    assert len(set(first.values())) == len(auth.ROLES)


def test_a_group_readable_credentials_directory_is_made_private(tmp_path: Path) -> None:
    directory = tmp_path / "creds"
    directory.mkdir(mode=0o755)
    auth.ensure_credentials(directory, ("client",))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_the_server_configuration_names_public_keys_never_seeds(tmp_path: Path) -> None:
    keys = auth.ensure_credentials(tmp_path / "creds")
    text = config_text(
        ServerOptions(port=4222, authorization=auth.authorization_block(keys, SUBJECTS)), tmp_path / "js"
    )
    assert text.count('"nkey"') == len(auth.ROLES)
    for role in auth.ROLES:
        assert keys[role] in text
        assert auth.seed_path(tmp_path / "creds", role).read_text().strip() not in text
    users = json.loads(text.split("authorization ", 1)[1])["users"]
    assert all(user["permissions"]["allow_responses"] is True for user in users)


def test_tls_needs_a_certificate_and_its_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both a certificate and its key"):
        config_text(ServerOptions(port=4222, tls_cert=tmp_path / "cert.pem"), tmp_path)
    text = config_text(
        ServerOptions(port=4222, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem"), tmp_path
    )
    assert f'cert_file: "{tmp_path / "c.pem"}"' in text and f'key_file: "{tmp_path / "k.pem"}"' in text


def test_a_service_passes_a_seed_or_a_creds_file_to_nats_py(tmp_path: Path) -> None:
    auth.ensure_credentials(tmp_path, ("worker",))
    seed = auth.seed_path(tmp_path, "worker")
    assert auth.ClientAuth(seed).connect_options() == {"nkeys_seed": str(seed)}
    jwt = tmp_path / "user.creds"
    jwt.write_text("-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n")
    assert auth.ClientAuth(jwt).connect_options() == {"user_credentials": str(jwt)}
    junk = tmp_path / "junk"
    junk.write_text("password123")
    with pytest.raises(ValueError, match="not a NATS credentials file"):
        auth.ClientAuth(junk).connect_options()
    assert auth.ClientAuth().connect_options() == {}


def test_client_auth_travels_to_a_child_as_paths(tmp_path: Path) -> None:
    original = auth.ClientAuth(tmp_path / "w.nk", tls_ca=tmp_path / "ca.pem")
    assert auth.ClientAuth.from_paths(original.paths()) == original
    assert set(original.paths()) == {"creds", "tls_ca"}


def test_natron_creds_writes_the_seeds_and_the_servers_authorization(tmp_path: Path) -> None:
    assert creds.main([str(tmp_path / "creds"), "--prefix", "edge"]) == 0
    conf = tmp_path / "creds" / creds.AUTH_CONF
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    text = conf.read_text()
    assert text.startswith("authorization ") and "edge.infer.>" in text
    for role in auth.ROLES:
        assert auth.seed_path(tmp_path / "creds", role).exists()


def test_a_worker_with_an_identity_of_its_own_writes_only_its_report(tmp_path: Path) -> None:
    keys = auth.ensure_worker_credentials(tmp_path, ["box-cpu-0", "box-ensemble"])
    assert stat.S_IMODE((tmp_path / "workers").stat().st_mode) == 0o700
    assert auth.ensure_worker_credentials(tmp_path, ["box-cpu-0"]) == {"box-cpu-0": keys["box-cpu-0"]}
    own = auth.permissions("worker", SUBJECTS, report_key="box-cpu-0")["publish"]["allow"]
    assert "$KV.natron_workers.box-cpu-0" in own and "$KV.natron_workers.>" not in own
    block = auth.authorization_block({}, SUBJECTS, {"box-cpu-0": ("worker", keys["box-cpu-0"])})
    (user,) = json.loads(block.split(" ", 1)[1])["users"]
    assert user["nkey"] == keys["box-cpu-0"]
    with pytest.raises(ValueError, match="cannot name a credentials file"):
        auth.ensure_worker_credentials(tmp_path, ["../escape"])


def test_natron_serve_gives_each_worker_and_the_orchestrator_its_own_identity(tmp_path: Path) -> None:
    from natron.cli.serve import embedded_access, orchestrator_id, plan_children, worker_ids
    from natron.settings import ServeSettings

    (tmp_path / "models").mkdir()
    settings = ServeSettings(model_repository=(tmp_path / "models",), workers=2)
    ids = [*worker_ids(settings, [], "box"), orchestrator_id("box")]
    assert ids == ["box-cpu-0", "box-cpu-1", "box-ensemble"]
    auth.ensure_credentials(tmp_path / "creds")
    auth.ensure_worker_credentials(tmp_path / "creds", ids)
    access = embedded_access(settings, tmp_path / "creds", ids)
    children = {c.name: c.settings for c in plan_children(settings, "nats://n:1", [], "box", 1, None, access)}
    assert children["worker-0"].nats_creds == auth.worker_seed_path(tmp_path / "creds", "box-cpu-0")
    assert children["worker-1"].nats_creds == auth.worker_seed_path(tmp_path / "creds", "box-cpu-1")
    assert children["ensemble"].nats_creds == auth.worker_seed_path(tmp_path / "creds", "box-ensemble")
    assert children["router"].nats_creds == auth.seed_path(tmp_path / "creds", "router")
    assert children["gateway"].nats_creds == auth.seed_path(tmp_path / "creds", "gateway")


def test_a_credentials_file_that_is_not_there_is_refused_at_start_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from natron.cli.main import parse

    missing = tmp_path / "worker.nk"
    with pytest.raises(SystemExit) as exited:
        parse(["worker", "--nats-creds", str(missing)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "nats_creds" in error and "--nats-creds" in error and str(missing) in error
