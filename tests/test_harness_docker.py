"""The Docker-backed test server (``DockerPostgres``): published on 127.0.0.1 only, with a
password generated per server (scram-sha-256 for every connection), never trust.

The configuration it asks of the image is checked without an engine; the server itself runs
when a Docker engine answers on this machine and the image is there (or can be pulled), and
those tests skip, saying which, otherwise. ``RESILIENT_DB_TEST_DOCKER_IMAGE`` picks the image.
"""

from __future__ import annotations

import gc
import inspect
import os
import warnings
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from resilient_db.testing import DockerPostgres, ServerStartError
from resilient_db.testing._server import (
    _DEFAULT_DOCKER_IMAGE,
    docker_container_settings,
    postgres_container_class,
)


def test_the_container_is_asked_for_a_password_and_loopback_only() -> None:
    wanted = docker_container_settings(
        password="s3cret", host_port=25432, settings={"fsync": "off", "jit": "off"}
    )
    assert wanted["env"] == {
        "POSTGRES_PASSWORD": "s3cret",
        "POSTGRES_INITDB_ARGS": "--auth=scram-sha-256",  # local connections too
    }
    assert "POSTGRES_HOST_AUTH_METHOD" not in wanted["env"]
    assert wanted["ports"] == {"5432/tcp": ("127.0.0.1", 25432)}
    assert wanted["command"] == [
        "postgres",
        "-c",
        "listen_addresses=*",  # inside the container: where Docker's forwarding arrives
        "-c",
        "fsync=off",
        "-c",
        "jit=off",
    ]


def test_testcontainers_postgres_class_is_found_where_the_installed_release_keeps_it() -> None:
    """testcontainers 4.15 moved ``PostgresContainer`` to ``testcontainers.community.postgres``
    (the old module warns); 4.4 to 4.14 have it in ``testcontainers.postgres`` only, where the
    harness once said "needs testcontainers" although it was installed."""
    pytest.importorskip("testcontainers")
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        found = postgres_container_class()
    # not through 4.15's deprecated alias (which says "... is deprecated, use
    # testcontainers.community.postgres instead")
    assert not [w for w in heard if "testcontainers.community" in str(w.message)]
    assert found.__name__ == "PostgresContainer"
    assert found.__module__ in ("testcontainers.community.postgres", "testcontainers.postgres")
    # it takes what DockerPostgres gives it (made only with an engine: it connects to Docker)
    parameters = inspect.signature(found).parameters
    assert {"username", "password", "dbname", "driver"} <= set(parameters)


def test_each_server_has_a_password_of_its_own_in_its_urls() -> None:
    first, second = DockerPostgres(), DockerPostgres()
    urls = [sa.make_url(s.url_at("127.0.0.1", 5432)) for s in (first, second)]
    passwords = [url.password for url in urls]
    assert all(isinstance(p, str) and len(p) >= 24 for p in passwords)
    assert passwords[0] != passwords[1]
    assert "postgres" not in passwords


def _docker_or_skip(image: str) -> Any:
    """A docker-py client when an engine answers and the image (and testcontainers' reaper
    image, unless disabled) is there or can be pulled; otherwise skip, saying why."""
    docker = pytest.importorskip("docker")
    pytest.importorskip("testcontainers")
    from testcontainers.core.config import testcontainers_config  # noqa: PLC0415

    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and not os.path.exists(host[len("unix://") :]):
        # no engine socket: don't let docker-py try (its failed client leaves a socket open)
        pytest.skip(f"no Docker engine on this machine ({host} does not exist)")
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:  # docker.errors.DockerException and socket errors
        with warnings.catch_warnings():
            # docker-py's failed client leaves its socket to the garbage collector: collect it
            # here, not in whichever test runs next (where it would be an unraisable warning)
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        pytest.skip(f"no Docker engine on this machine ({type(exc).__name__}: {exc})")
    needed = [image]
    if not testcontainers_config.ryuk_disabled:
        needed.append(testcontainers_config.ryuk_image)
    for name in needed:
        try:
            client.images.get(name)
        except docker.errors.ImageNotFound:
            try:
                client.images.pull(name)
            except Exception as exc:  # no registry reachable
                client.close()
                pytest.skip(f"Docker image {name} is not here and could not be pulled: {exc}")
    return client


@pytest.fixture(scope="module")
def docker_server() -> Iterator[tuple[DockerPostgres, Any]]:
    image = os.environ.get("RESILIENT_DB_TEST_DOCKER_IMAGE", "").strip() or _DEFAULT_DOCKER_IMAGE
    client = _docker_or_skip(image)
    server = DockerPostgres(image)
    try:
        server.start()
        yield server, client
    finally:
        server.close()
        client.close()


@pytest.mark.slow
def test_the_docker_server_listens_on_loopback_and_needs_its_password(
    docker_server: tuple[DockerPostgres, Any],
) -> None:
    server, client = docker_server
    assert server.host == "127.0.0.1"
    (container,) = client.containers.list(
        filters={"publish": f"{server.port}/tcp", "status": "running"}
    )
    bindings = container.attrs["HostConfig"]["PortBindings"]
    assert bindings == {"5432/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(server.port)}]}
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    assert "POSTGRES_HOST_AUTH_METHOD" not in env
    # the harness's URL works; without the password, or with another, nobody gets in
    engine = sa.create_engine(server.url())
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT current_user").scalar() == "postgres"
            trusted = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_hba_file_rules WHERE auth_method = 'trust'"
            ).scalar()
            assert trusted == 0  # not even local connections inside the container
    finally:
        engine.dispose()
    for password in (None, "postgres"):
        options = {} if password is None else {"password": password}
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(
                host="127.0.0.1",
                port=server.port,
                user="postgres",
                dbname="postgres",
                connect_timeout=5,
                **options,
            ).close()


@pytest.mark.slow
def test_the_docker_server_keeps_its_address_and_password_across_a_restart(
    docker_server: tuple[DockerPostgres, Any],
) -> None:
    server, _ = docker_server
    url = server.url()
    server.restart(crash=True)
    assert server.url() == url
    assert server.execute("SELECT 1") == [(1,)]


def test_a_docker_server_made_in_code_says_what_it_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """``DockerPostgres()`` made in a test's code, with no ``RESILIENT_DB_TEST_DOCKER`` set:
    its errors said "RESILIENT_DB_TEST_DOCKER is set but no Docker engine is reachable", a
    variable nobody had set; they name the class (and the variable that also makes one)."""
    monkeypatch.delenv("RESILIENT_DB_TEST_DOCKER", raising=False)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    server = DockerPostgres()
    with pytest.raises(ServerStartError, match=r"^DockerPostgres .*no Docker engine") as caught:
        server.start()
    assert "is set" not in str(caught.value)
    server.close()
    del caught  # (its traceback holds docker-py's failed client)
    with warnings.catch_warnings():  # docker-py's failed client leaves its socket to the GC
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
